//! Container images: OCI image layouts, `docker save` archives and plain
//! root-filesystem directories, turned into a root filesystem (a directory
//! for an OCI runtime, an ext4 disk for a micro-VM) plus the image's
//! process configuration.

mod config;

pub use config::ImageConfig;
