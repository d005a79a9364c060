//! The files a model carries in the zip appended to its flatbuffer (where
//! tflite-support's metadata populator puts the label file), read by name.
//!
//! A small reader of the central directory rather than a crate: only one
//! named file is ever read, the populator writes its entries stored (not
//! compressed), and flate2, already a dependency for `.tar.gz` models, reads
//! the deflated ones other writers may make. The bytes are untrusted: every
//! offset and length is checked against the file, the entry's CRC-32 is
//! checked, and what a file may unpack to is bounded.

use std::io::Read;

/// The most an embedded file may unpack to (a label file is far smaller).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

const END_OF_DIRECTORY: u32 = 0x0605_4b50;
const DIRECTORY_ENTRY: u32 = 0x0201_4b50;
const LOCAL_HEADER: u32 = 0x0403_4b50;
const END_LEN: usize = 22;
const ENTRY_LEN: usize = 46;
const LOCAL_LEN: usize = 30;

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// The end-of-central-directory record: its position, where the directory
/// starts and how many entries it has. The record ends the file, followed
/// only by its comment; the directory lies just before it.
fn end_of_directory(bytes: &[u8]) -> Option<(usize, usize, usize)> {
    let last = bytes.len().checked_sub(END_LEN)?;
    let first = last.saturating_sub(u16::MAX as usize);
    let ends_here = |at: usize| {
        let comment = u16_at(bytes, at + 20).map(usize::from);
        u32_at(bytes, at) == Some(END_OF_DIRECTORY) && comment.is_some_and(|c| at + END_LEN + c == bytes.len())
    };
    let at = (first..=last).rev().find(|&at| ends_here(at))?;
    let entries = u16_at(bytes, at + 10)? as usize;
    let size = u32_at(bytes, at + 12)? as usize;
    let start = at.checked_sub(size)?;
    Some((at, start, entries))
}

/// The bytes of the file `name` in the zip that ends `bytes`: `Ok(None)` if
/// there is no zip, an error if the zip is broken, does not hold the file
/// or holds it in a way this reader does not take.
pub fn find(bytes: &[u8], name: &str) -> Result<Option<Vec<u8>>, String> {
    let Some((end, start, entries)) = end_of_directory(bytes) else { return Ok(None) };
    let declared = u32_at(bytes, end + 16).ok_or("the zip's end record is cut short")? as usize;
    if entries == 0xffff || declared == 0xffff_ffff {
        return Err("the zip is a ZIP64 archive, which is not supported".into());
    }
    // A zip appended to other bytes keeps the offsets it had alone; the
    // difference between where the directory is and where it says it is
    // shifts every offset.
    let shift = start.checked_sub(declared).ok_or("the zip's directory offset lies past the directory")?;
    let directory = &bytes[start..end];
    let mut at = 0;
    for _ in 0..entries {
        let broken = || format!("the zip's directory is broken at entry offset {at}");
        if u32_at(directory, at) != Some(DIRECTORY_ENTRY) {
            return Err(broken());
        }
        let field16 = |off| u16_at(directory, at + off).ok_or_else(broken);
        let field32 = |off| u32_at(directory, at + off).ok_or_else(broken);
        let (flags, method) = (field16(8)?, field16(10)?);
        let (crc, packed, unpacked) = (field32(16)?, field32(20)? as usize, field32(24)? as u64);
        let (name_len, extra_len, comment_len) = (field16(28)? as usize, field16(30)? as usize, field16(32)? as usize);
        let local = field32(42)? as usize;
        let entry_name = directory.get(at + ENTRY_LEN..at + ENTRY_LEN + name_len).ok_or_else(broken)?;
        at += ENTRY_LEN + name_len + extra_len + comment_len;
        if entry_name != name.as_bytes() {
            continue;
        }
        if flags & 1 != 0 {
            return Err(format!("{name} is encrypted in the zip"));
        }
        if unpacked > MAX_FILE_BYTES {
            return Err(format!("{name} unpacks to more than {} MiB", MAX_FILE_BYTES >> 20));
        }
        let local = local.checked_add(shift).ok_or("a zip offset overflows")?;
        if u32_at(bytes, local) != Some(LOCAL_HEADER) {
            return Err(format!("{name}: the zip's local header is missing"));
        }
        let local_name = u16_at(bytes, local + 26).ok_or("cut short")? as usize;
        let local_extra = u16_at(bytes, local + 28).ok_or("cut short")? as usize;
        let data = local + LOCAL_LEN + local_name + local_extra;
        let packed =
            bytes.get(data..data.saturating_add(packed)).ok_or_else(|| format!("{name} is cut short in the zip"))?;
        let content = match method {
            0 => packed.to_vec(),
            8 => {
                let mut content = vec![];
                flate2::read::DeflateDecoder::new(packed)
                    .take(unpacked + 1)
                    .read_to_end(&mut content)
                    .map_err(|e| format!("{name}: corrupt deflate data in the zip: {e}"))?;
                content
            }
            other => return Err(format!("{name} is packed with zip method {other}, only stored and deflate are read")),
        };
        if content.len() as u64 != unpacked {
            return Err(format!("{name} is {} bytes in the zip, which says {unpacked}", content.len()));
        }
        if crc32fast::hash(&content) != crc {
            return Err(format!("{name} fails its CRC-32 check in the zip"));
        }
        return Ok(Some(content));
    }
    Err(format!("the zip appended to the model holds no {name}"))
}

/// Writes a zip of stored files, as tflite-support's populator does, for
/// the tests.
#[cfg(test)]
pub(crate) fn stored_zip(files: &[(&str, &[u8])]) -> Vec<u8> {
    let (mut zip, mut directory) = (vec![], vec![]);
    for (name, data) in files {
        let crc = crc32fast::hash(data);
        let header = |signature: u32, central: bool| {
            let mut h = signature.to_le_bytes().to_vec();
            if central {
                h.extend(20u16.to_le_bytes()); // made by
            }
            h.extend(20u16.to_le_bytes()); // version needed
            h.extend([0u8; 4]); // flags, method (stored)
            h.extend([0u8; 4]); // time, date
            h.extend(crc.to_le_bytes());
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((name.len() as u16).to_le_bytes());
            h.extend(0u16.to_le_bytes()); // extra
            h
        };
        let mut entry = header(DIRECTORY_ENTRY, true);
        entry.extend([0u8; 6]); // comment length, disk, internal attributes
        entry.extend([0u8; 4]); // external attributes
        entry.extend((zip.len() as u32).to_le_bytes());
        entry.extend(name.as_bytes());
        directory.extend(entry);
        zip.extend(header(LOCAL_HEADER, false));
        zip.extend(name.as_bytes());
        zip.extend(*data);
    }
    let offset = zip.len() as u32;
    zip.extend(&directory);
    zip.extend(END_OF_DIRECTORY.to_le_bytes());
    zip.extend([0u8; 4]);
    zip.extend((files.len() as u16).to_le_bytes());
    zip.extend((files.len() as u16).to_le_bytes());
    zip.extend((directory.len() as u32).to_le_bytes());
    zip.extend(offset.to_le_bytes());
    zip.extend(0u16.to_le_bytes());
    zip
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_with_zip() -> Vec<u8> {
        let mut bytes = b"a flatbuffer, say".to_vec();
        bytes.extend(stored_zip(&[("ids.txt", b"/m/1\n/m/2\n"), ("labels-en.txt", b"red\ngreen\n")]));
        bytes
    }

    #[test]
    fn finds_a_stored_file_in_a_zip_appended_to_other_bytes() {
        let bytes = model_with_zip();
        assert_eq!(find(&bytes, "labels-en.txt").unwrap().unwrap(), b"red\ngreen\n");
        assert_eq!(find(&bytes, "ids.txt").unwrap().unwrap(), b"/m/1\n/m/2\n");
        let err = find(&bytes, "labels.txt").unwrap_err();
        assert_eq!(err, "the zip appended to the model holds no labels.txt");
        assert_eq!(find(b"no zip here, only a flatbuffer", "labels.txt").unwrap(), None);
    }

    #[test]
    fn reads_what_python_zipfile_writes_deflated() {
        // As Python's zipfile.ZIP_DEFLATED writes it: method 8, packed size.
        let mut bytes = b"TFL".to_vec();
        let mut deflated = vec![];
        let text = "cat\ndog\n".repeat(4);
        std::io::Write::write_all(
            &mut flate2::write::DeflateEncoder::new(&mut deflated, flate2::Compression::default()),
            text.as_bytes(),
        )
        .unwrap();
        let mut zip = stored_zip(&[("l.txt", text.as_bytes())]);
        // The same entry, deflated: method 8 and the packed size, in both headers.
        let local_data = LOCAL_LEN + "l.txt".len();
        let rest = zip.split_off(local_data + text.len());
        zip.truncate(local_data);
        zip[8] = 8;
        zip[18..22].copy_from_slice(&(deflated.len() as u32).to_le_bytes());
        zip.extend(&deflated);
        let mut directory = rest;
        directory[10] = 8;
        directory[20..24].copy_from_slice(&(deflated.len() as u32).to_le_bytes());
        let at = directory.len() - END_LEN;
        directory[at + 16..at + 20].copy_from_slice(&(zip.len() as u32).to_le_bytes());
        zip.extend(directory);
        bytes.extend(zip);
        assert_eq!(find(&bytes, "l.txt").unwrap().unwrap(), text.as_bytes());
    }

    #[test]
    fn broken_zips_are_errors_not_panics() {
        let good = model_with_zip();
        for len in 0..good.len() {
            // Cut short, the end record is gone (no zip) or the rest is.
            let _ = find(&good[..len], "labels-en.txt");
        }
        let mut caught = 0;
        for at in 0..good.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut corrupt = good.clone();
                corrupt[at] ^= flip;
                match find(&corrupt, "labels-en.txt") {
                    Ok(Some(content)) => assert_eq!(content, b"red\ngreen\n", "flip {flip:#x} at {at}"),
                    _ => caught += 1,
                }
            }
        }
        assert!(caught > 100, "only {caught} corruptions caught");
        // A flipped byte of the label file itself fails the CRC.
        let mut corrupt = good.clone();
        let at = good.windows(3).position(|w| w == b"red").unwrap();
        corrupt[at] = b'R';
        assert!(find(&corrupt, "labels-en.txt").unwrap_err().contains("CRC-32"));
    }
}
