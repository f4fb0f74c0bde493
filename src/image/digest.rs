//! Content digests (`sha256:<hex>`): every blob vmlab reads from an image
//! is hashed while it is read and compared with the digest that names it,
//! so a corrupted or tampered blob is refused instead of used.

use std::io::{self, Read};

use oci_spec::image::{Digest, DigestAlgorithm};
use sha2::{Digest as _, Sha256, Sha384, Sha512};

use super::Error;

/// A running hash of one of the algorithms OCI digests use.
#[derive(Clone)]
pub enum Hasher {
    /// SHA-256 (what every image tool writes).
    Sha256(Sha256),
    /// SHA-384.
    Sha384(Sha384),
    /// SHA-512.
    Sha512(Sha512),
}

impl Hasher {
    /// A hasher for `digest`'s algorithm; an error for algorithms vmlab
    /// cannot verify (it never uses an unverified blob).
    pub fn for_digest(digest: &Digest) -> Result<Hasher, Error> {
        match digest.algorithm() {
            DigestAlgorithm::Sha256 => Ok(Hasher::Sha256(Sha256::new())),
            DigestAlgorithm::Sha384 => Ok(Hasher::Sha384(Sha384::new())),
            DigestAlgorithm::Sha512 => Ok(Hasher::Sha512(Sha512::new())),
            other => Err(Error::Unsupported(format!(
                "digest algorithm {other} (of {digest}): vmlab verifies sha256, sha384 and sha512"
            ))),
        }
    }

    /// A SHA-256 hasher.
    pub fn sha256() -> Hasher {
        Hasher::Sha256(Sha256::new())
    }

    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha384(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest so far as `algorithm:hex`.
    pub fn finish(self) -> String {
        let (name, bytes) = match self {
            Hasher::Sha256(h) => ("sha256", h.finalize().to_vec()),
            Hasher::Sha384(h) => ("sha384", h.finalize().to_vec()),
            Hasher::Sha512(h) => ("sha512", h.finalize().to_vec()),
        };
        format!("{name}:{}", crate::cmdline::hex(&bytes))
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_of(bytes: &[u8]) -> String {
    let mut h = Hasher::sha256();
    h.update(bytes);
    h.finish()
}

/// Parses a digest string found in image metadata (a diff ID, a file name).
pub fn parse(s: &str, what: &str) -> Result<Digest, Error> {
    s.parse::<Digest>()
        .map_err(|e| Error::Format(format!("{what}: {s:?} is not a valid digest: {e}")))
}

/// A reader that hashes and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R, hasher: Hasher) -> Self {
        HashingReader {
            inner,
            hasher,
            count: 0,
        }
    }

    /// Reads what is left (a tar archive ends before its padding, a gzip
    /// stream may carry trailing bytes: they are part of the blob too).
    pub fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(|_| ())
    }

    /// The digest and byte count of everything read.
    pub fn finish(self) -> (String, u64) {
        (self.hasher.finish(), self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        // `n <= buf.len()` by the Read contract; `get` keeps a broken
        // reader from panicking here.
        self.hasher.update(buf.get(..n).unwrap_or(&[]));
        self.count += n as u64;
        Ok(n)
    }
}

/// Checks a computed digest (and size, when known) against the expected
/// ones; `what` names the blob in the error ("layer 2 of ...").
pub fn check(
    what: &str,
    expected: &Digest,
    actual: &str,
    expected_size: Option<u64>,
    actual_size: u64,
) -> Result<(), Error> {
    if let Some(size) = expected_size {
        if size != actual_size {
            return Err(Error::SizeMismatch {
                what: what.to_string(),
                expected: size,
                actual: actual_size,
            });
        }
    }
    if expected.as_ref() != actual {
        return Err(Error::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn hashes_what_it_reads() {
        let mut r = HashingReader::new(&b"abc"[..], Hasher::sha256());
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        let (d, n) = r.finish();
        assert_eq!(n, 3);
        assert_eq!(
            d,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256_of(b""), EMPTY_SHA256);
    }

    #[test]
    fn mismatches_are_errors() {
        let d = parse(EMPTY_SHA256, "test").unwrap();
        check("blob", &d, EMPTY_SHA256, Some(0), 0).unwrap();
        let e = check("blob", &d, &sha256_of(b"x"), None, 1).unwrap_err();
        assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
        let e = check("blob", &d, EMPTY_SHA256, Some(5), 0).unwrap_err();
        assert!(matches!(e, Error::SizeMismatch { .. }), "{e}");
        assert!(parse("sha256:xyz", "test").is_err());
        let md5 = parse("md5:d41d8cd98f00b204e9800998ecf8427e", "test").unwrap();
        assert!(Hasher::for_digest(&md5).is_err());
    }
}
