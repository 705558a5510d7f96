//! TPM 2.0 wire format: big-endian integers and size-prefixed (`TPM2B_*`) buffers, read and
//! written exactly as the TPM marshals them.

use super::TpmError;

/// Reads TPM structures from a byte slice, failing cleanly on truncation.
pub struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads `bytes`, naming `what` in errors.
    pub fn new(bytes: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { bytes, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], TpmError> {
        if self.bytes.len() < n {
            return Err(TpmError::Malformed(format!("{} is truncated", self.what)));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, TpmError> {
        Ok(self.take(1)?[0])
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> Result<u16, TpmError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32, TpmError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> Result<u64, TpmError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A `TPM2B_*`: a 16-bit size and that many bytes.
    pub fn sized(&mut self) -> Result<&'a [u8], TpmError> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    /// Fails unless everything was read: trailing bytes mean the structure is not what it claims.
    pub fn finish(self) -> Result<(), TpmError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(TpmError::Malformed(format!(
                "{} has {} trailing bytes",
                self.what,
                self.bytes.len()
            )))
        }
    }
}

/// Appends a `TPM2B_*` (16-bit size, then the bytes).
pub fn put_sized(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), TpmError> {
    let n = u16::try_from(bytes.len())
        .map_err(|_| TpmError::Malformed("buffer too large for a TPM2B".into()))?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_integers_and_sized_buffers_and_reports_truncation() {
        let mut out = vec![0x12, 0x34, 0, 0, 0, 7];
        put_sized(&mut out, b"abc").unwrap();
        let mut r = Reader::new(&out, "test");
        assert_eq!(r.u16().unwrap(), 0x1234);
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.sized().unwrap(), b"abc");
        r.finish().unwrap();

        let mut r = Reader::new(&[0, 5, 1, 2], "thing");
        let error = r.sized().unwrap_err();
        assert!(error.to_string().contains("thing is truncated"), "{error}");
        let r = Reader::new(&[1], "thing");
        assert!(r.finish().unwrap_err().to_string().contains("trailing"));
    }
}
