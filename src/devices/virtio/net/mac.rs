//! MAC addresses: parsing, printing, the locally administered default.

use std::fmt;
use std::str::FromStr;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address (02:xx:xx:xx:xx:xx
    /// with bit 1 of the first octet set and bit 0 clear), so that it can
    /// clash with no vendor's address. The bytes come from getrandom; if
    /// that fails, from the pid, `index` and the clock.
    pub fn random_local(index: usize) -> MacAddr {
        let mut bytes = [0u8; 6];
        // SAFETY: getrandom writes at most `bytes.len()` bytes into the
        // live local array.
        let n =
            unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), libc::GRND_NONBLOCK) };
        if usize::try_from(n).ok() != Some(bytes.len()) {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let mix = u64::from(std::process::id())
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(index as u64)
                ^ u64::from(nanos);
            bytes.copy_from_slice(&mix.to_le_bytes()[..6]);
        }
        bytes[0] = (bytes[0] & !0x01) | 0x02;
        MacAddr(bytes)
    }

    /// Bit 0 of the first octet: a group address, which no NIC may have.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;

    /// Six two-digit hex octets separated by `:` (or `-`); a multicast or
    /// all-zero address is refused, since a NIC cannot have one.
    fn from_str(s: &str) -> Result<MacAddr, String> {
        let bad = || format!("'{s}' is not a MAC address (six hex octets: 02:00:00:aa:bb:cc)");
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut bytes = [0u8; 6];
        let mut parts = s.split(sep);
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        let mac = MacAddr(bytes);
        if mac.is_multicast() {
            return Err(format!(
                "{s} is a multicast address (lowest bit of the first octet set); a NIC needs a \
                 unicast one"
            ));
        }
        if bytes == [0; 6] {
            return Err(format!("{s}: the all-zero MAC address is not valid"));
        }
        Ok(mac)
    }
}
