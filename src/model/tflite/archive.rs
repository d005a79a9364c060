//! Finds the TFLite flatbuffer in what a model URL answers: the file itself,
//! or (as Kaggle serves it) a gzip'd tar holding exactly one. Recognised by
//! content, never by name.

use std::borrow::Cow;
use std::io::Read;

/// The most a model may unpack to: larger than any mobile classifier, small
/// enough that a gzip bomb cannot exhaust memory.
pub const MAX_UNPACKED_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("not a TensorFlow Lite model nor a gzip'd tar holding one")]
    Unrecognised,
    #[error("corrupt gzip data: {0}")]
    Gzip(std::io::Error),
    #[error("corrupt tar archive: {0}")]
    Tar(std::io::Error),
    #[error("the archive unpacks to more than {} MiB", MAX_UNPACKED_BYTES >> 20)]
    TooLarge,
    #[error("the archive holds no .tflite model")]
    NoModel,
    #[error("the archive holds {0} .tflite models ({1}); expected exactly one")]
    SeveralModels(usize, String),
}

/// Whether `bytes` start like a TFLite flatbuffer (identifier `TFL3`).
pub fn is_tflite(bytes: &[u8]) -> bool {
    bytes.get(4..8) == Some(b"TFL3")
}

fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

fn is_tar(bytes: &[u8]) -> bool {
    bytes.get(257..262) == Some(b"ustar")
}

/// Returns the TFLite flatbuffer in `bytes`.
pub fn extract_tflite(bytes: &[u8]) -> Result<Cow<'_, [u8]>, ArchiveError> {
    if is_tflite(bytes) {
        return Ok(Cow::Borrowed(bytes));
    }
    if !is_gzip(bytes) {
        return Err(ArchiveError::Unrecognised);
    }
    let mut unpacked = vec![];
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_UNPACKED_BYTES + 1)
        .read_to_end(&mut unpacked)
        .map_err(ArchiveError::Gzip)?;
    if unpacked.len() as u64 > MAX_UNPACKED_BYTES {
        return Err(ArchiveError::TooLarge);
    }
    if is_tflite(&unpacked) {
        return Ok(Cow::Owned(unpacked));
    }
    if !is_tar(&unpacked) {
        return Err(ArchiveError::Unrecognised);
    }
    let mut found: Vec<(String, Vec<u8>)> = vec![];
    let mut archive = tar::Archive::new(&unpacked[..]);
    for entry in archive.entries().map_err(ArchiveError::Tar)? {
        let mut entry = entry.map_err(ArchiveError::Tar)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
        let mut content = vec![];
        entry.read_to_end(&mut content).map_err(ArchiveError::Tar)?;
        if is_tflite(&content) {
            found.push((name, content));
        }
    }
    match found.len() {
        0 => Err(ArchiveError::NoModel),
        1 => Ok(Cow::Owned(found.pop().expect("one entry").1)),
        n => Err(ArchiveError::SeveralModels(
            n,
            found.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(", "),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn fake_tflite(tag: u8) -> Vec<u8> {
        let mut b = vec![0, 0, 0, 0];
        b.extend_from_slice(b"TFL3");
        b.extend_from_slice(&[tag; 32]);
        b
    }

    fn tgz(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(vec![]);
        for (name, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, *data).unwrap();
        }
        gzip(&tar.into_inner().unwrap())
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn raw_tflite_passes_through() {
        let model = fake_tflite(1);
        assert_eq!(&*extract_tflite(&model).unwrap(), &model[..]);
    }

    #[test]
    fn finds_the_model_in_a_tgz_by_content_not_name() {
        let model = fake_tflite(2);
        let archive = tgz(&[("README", b"hello"), ("weights.bin", &model)]);
        assert_eq!(&*extract_tflite(&archive).unwrap(), &model[..]);
        assert_eq!(&*extract_tflite(&gzip(&model)).unwrap(), &model[..]);
    }

    #[test]
    fn refuses_archives_without_exactly_one_model() {
        let none = tgz(&[("a.txt", b"nothing here")]);
        assert!(matches!(extract_tflite(&none), Err(ArchiveError::NoModel)));
        let two = tgz(&[("a.tflite", &fake_tflite(1)), ("b.tflite", &fake_tflite(2))]);
        let err = extract_tflite(&two).unwrap_err();
        assert!(err.to_string().contains("a.tflite, b.tflite"), "{err}");
    }

    #[test]
    fn refuses_other_content() {
        assert!(matches!(extract_tflite(b"<html>nope</html>"), Err(ArchiveError::Unrecognised)));
        assert!(matches!(extract_tflite(&gzip(b"plain text")), Err(ArchiveError::Unrecognised)));
        let archive = tgz(&[("m.tflite", &fake_tflite(1))]);
        let truncated = &archive[..archive.len() / 2];
        assert!(matches!(extract_tflite(truncated), Err(ArchiveError::Gzip(_))));
    }
}
