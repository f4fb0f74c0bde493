//! virtio-blk request counters.

device_counters! {
    /// A snapshot of a disk's request counters.
    pub struct BlockStats / Counters {
        /// Requests taken from the queue.
        requests,
        /// Malformed requests (failed validation).
        invalid,
        /// Requests of a type the device does not implement.
        unsupported,
        /// Well-formed requests the host failed to carry out.
        io_errors,
        /// Bytes read from the image into the guest.
        bytes_read,
        /// Bytes written to the image from the guest.
        bytes_written,
        /// FLUSH requests completed.
        flushes,
    }
}
