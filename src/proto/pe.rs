//! Whether a kernel carries an Authenticode signature, from its PE header
//! alone: UEFI Secure Boot (and shim's verifier in GRUB) runs only EFI
//! images signed by a key it trusts, and an unsigned kernel is the
//! commonest reason a Secure Boot machine refuses an image.
//!
//! Written by hand rather than with `goblin` or `object`: two fields of
//! the header are needed (the optional header's security directory), and
//! those crates parse a whole image held in memory, here an 8 MB kernel
//! read on every image check. The panel's image check reads the header
//! ([`HEADER_BYTES`]) and hands it in. Whether the signature is one the firmware
//! trusts is the firmware's to decide; this says only that there is one.

/// What a kernel's header says about its signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Signature {
    /// A PE image with a certificate table (an Authenticode signature).
    Signed,
    /// A PE image without one: Secure Boot firmware refuses it.
    Unsigned,
    /// Not a PE/EFI image at all (an older bzImage without the EFI stub,
    /// or not a kernel): it cannot boot under UEFI Secure Boot.
    NotEfi,
}

/// How much of a file [`signature`] needs: the DOS stub, the PE header and
/// the optional header's data directories fit in the first 4 KiB of every
/// kernel and EFI binary in practice.
pub const HEADER_BYTES: usize = 4096;

/// The signature state of a PE image whose first bytes are `header` (at
/// most [`HEADER_BYTES`] are read) and whose length is `file_len`.
pub fn signature(header: &[u8], file_len: u64) -> Signature {
    let u16_at = |at: usize| {
        header
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        header
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if header.get(..2) != Some(b"MZ") {
        return Signature::NotEfi;
    }
    let Some(pe) = u32_at(0x3c).map(|at| at as usize) else {
        return Signature::NotEfi;
    };
    if header.get(pe..pe.saturating_add(4)) != Some(b"PE\0\0") {
        return Signature::NotEfi;
    }
    // COFF file header (20 bytes) after the signature, then the optional
    // header: PE32 keeps its data directories at +96, PE32+ at +112, each
    // after the count of them.
    let optional = pe + 24;
    let (count_at, directories) = match u16_at(optional) {
        Some(0x10b) => (optional + 92, optional + 96),
        Some(0x20b) => (optional + 108, optional + 112),
        _ => return Signature::NotEfi,
    };
    const SECURITY: usize = 4;
    match u32_at(count_at) {
        Some(count) if count as usize > SECURITY => {}
        Some(_) => return Signature::Unsigned,
        None => return Signature::NotEfi,
    }
    let entry = directories + SECURITY * 8;
    let (Some(offset), Some(size)) = (u32_at(entry), u32_at(entry + 4)) else {
        return Signature::NotEfi;
    };
    // A WIN_CERTIFICATE is at least its 8-byte header, and the table lies
    // inside the file (its "address" is a file offset).
    if size >= 8 && offset > 0 && u64::from(offset) + u64::from(size) <= file_len {
        Signature::Signed
    } else {
        Signature::Unsigned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal PE32+ header with `certificates` as its security
    /// directory, in a file of `len` bytes.
    fn pe(certificates: Option<(u32, u32)>, len: usize) -> Vec<u8> {
        let mut image = vec![0u8; len];
        image[..2].copy_from_slice(b"MZ");
        image[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        image[0x80..0x84].copy_from_slice(b"PE\0\0");
        let optional = 0x80 + 24;
        image[optional..optional + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        image[optional + 108..optional + 112].copy_from_slice(&16u32.to_le_bytes());
        if let Some((offset, size)) = certificates {
            let entry = optional + 112 + 4 * 8;
            image[entry..entry + 4].copy_from_slice(&offset.to_le_bytes());
            image[entry + 4..entry + 8].copy_from_slice(&size.to_le_bytes());
        }
        image
    }

    fn of(image: &[u8]) -> Signature {
        signature(&image[..image.len().min(HEADER_BYTES)], image.len() as u64)
    }

    #[test]
    fn a_certificate_table_inside_the_file_is_a_signature() {
        assert_eq!(of(&pe(Some((6000, 1000)), 7000)), Signature::Signed);
        assert_eq!(of(&pe(None, 7000)), Signature::Unsigned);
        // A table that runs past the end, or too short to hold a header.
        assert_eq!(of(&pe(Some((6000, 1001)), 7000)), Signature::Unsigned);
        assert_eq!(of(&pe(Some((6000, 4)), 7000)), Signature::Unsigned);
        assert_eq!(of(b"\x7fELF not a PE image"), Signature::NotEfi);
        assert_eq!(of(b"MZ"), Signature::NotEfi);
    }

    proptest! {
        #[test]
        fn any_bytes_give_an_answer_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..600), len in 0u64..100_000) {
            let _ = signature(&bytes, len);
            let mut image = pe(None, 600);
            image[..bytes.len()].copy_from_slice(&bytes);
            let _ = signature(&image, len);
        }
    }
}
