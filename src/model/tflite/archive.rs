//! Finds the model in what a model URL answers: a TFLite flatbuffer or an
//! ONNX protobuf, the file itself or (as Kaggle serves it) in a gzip'd tar
//! holding exactly one. Recognised by content, never by name.
//!
//! A TFLite file names itself (`TFL3` at byte 4). An ONNX file has no magic
//! number: it is a protobuf `ModelProto`, so `is_onnx` walks its top-level
//! fields, which costs a few reads however large the file, since the graph
//! is one length-delimited field that is skipped whole.

use std::borrow::Cow;
use std::io::Read;

/// The most a model may unpack to: larger than any mobile classifier, small
/// enough that a gzip bomb cannot exhaust memory.
pub const MAX_UNPACKED_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("not a TensorFlow Lite or ONNX model, nor a gzip'd tar holding one")]
    Unrecognised,
    #[error("corrupt gzip data: {0}")]
    Gzip(std::io::Error),
    #[error("corrupt tar archive: {0}")]
    Tar(std::io::Error),
    #[error("the archive unpacks to more than {} MiB", MAX_UNPACKED_BYTES >> 20)]
    TooLarge,
    #[error("the archive holds no TensorFlow Lite or ONNX model")]
    NoModel,
    #[error("the archive holds {0} models ({1}); expected exactly one")]
    SeveralModels(usize, String),
}

/// The kinds of model file the tool reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Tflite,
    Onnx,
}

impl Format {
    /// What `bytes` are, if a model.
    fn of(bytes: &[u8]) -> Option<Format> {
        if is_tflite(bytes) {
            Some(Format::Tflite)
        } else if is_onnx(bytes) {
            Some(Format::Onnx)
        } else {
            None
        }
    }
}

/// Whether `bytes` start like a TFLite flatbuffer (identifier `TFL3`).
pub fn is_tflite(bytes: &[u8]) -> bool {
    bytes.get(4..8) == Some(b"TFL3")
}

/// Whether `bytes` read as an ONNX `ModelProto`: every top-level field is a
/// well-formed protobuf field, those of `ModelProto` of their declared wire
/// type, and there is a graph (field 7) or the file starts with `ir_version`
/// (field 1), as every serializer writes it. A file cut short still counts,
/// so that it is reported as a truncated ONNX model, not as unknown bytes.
pub fn is_onnx(bytes: &[u8]) -> bool {
    const VARINT: u64 = 0;
    const LEN: u64 = 2;
    let mut at = 0;
    let (mut graph, mut first_is_version) = (false, false);
    let walked = (|| {
        while at < bytes.len() {
            let first = at == 0;
            let key = varint(bytes, &mut at)?;
            let (field, wire) = (key >> 3, key & 7);
            let declared = match field {
                1 | 5 => Some(VARINT),
                2 | 3 | 4 | 6 | 7 | 8 | 14 | 20 | 25 => Some(LEN),
                _ => None,
            };
            if field == 0 || declared.is_some_and(|d| d != wire) {
                return Err(Walk::Invalid);
            }
            first_is_version |= first && field == 1;
            graph |= field == 7;
            let end = match wire {
                VARINT => varint(bytes, &mut at).map(|_| at)?,
                1 => at + 8,
                LEN => usize::try_from(varint(bytes, &mut at)?).map_err(|_| Walk::Truncated)?.saturating_add(at),
                5 => at + 4,
                // Groups (3, 4) are long obsolete; 6 and 7 are not wire types.
                _ => return Err(Walk::Invalid),
            };
            if end > bytes.len() {
                return Err(Walk::Truncated);
            }
            at = end;
        }
        Ok(())
    })();
    match walked {
        Ok(()) => graph || first_is_version,
        Err(Walk::Truncated) => first_is_version,
        Err(Walk::Invalid) => false,
    }
}

/// Why a walk over protobuf fields stopped early.
enum Walk {
    /// The bytes end inside a field.
    Truncated,
    /// They are not protobuf, or not a `ModelProto`.
    Invalid,
}

/// The protobuf varint at `at`, moving `at` past it.
fn varint(bytes: &[u8], at: &mut usize) -> Result<u64, Walk> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at).ok_or(Walk::Truncated)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Walk::Invalid)
}

fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

fn is_tar(bytes: &[u8]) -> bool {
    bytes.get(257..262) == Some(b"ustar")
}

/// Returns the model in `bytes`, and its format.
pub fn extract_model(bytes: &[u8]) -> Result<(Format, Cow<'_, [u8]>), ArchiveError> {
    if let Some(format) = Format::of(bytes) {
        return Ok((format, Cow::Borrowed(bytes)));
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
    if let Some(format) = Format::of(&unpacked) {
        return Ok((format, Cow::Owned(unpacked)));
    }
    if !is_tar(&unpacked) {
        return Err(ArchiveError::Unrecognised);
    }
    let mut found: Vec<(String, Format, Vec<u8>)> = vec![];
    let mut archive = tar::Archive::new(&unpacked[..]);
    for entry in archive.entries().map_err(ArchiveError::Tar)? {
        let mut entry = entry.map_err(ArchiveError::Tar)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
        let mut content = vec![];
        entry.read_to_end(&mut content).map_err(ArchiveError::Tar)?;
        if let Some(format) = Format::of(&content) {
            found.push((name, format, content));
        }
    }
    match found.len() {
        0 => Err(ArchiveError::NoModel),
        1 => {
            let (_, format, content) = found.pop().expect("one entry");
            Ok((format, Cow::Owned(content)))
        }
        n => Err(ArchiveError::SeveralModels(
            n,
            found.iter().map(|(name, _, _)| name.as_str()).collect::<Vec<_>>().join(", "),
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

    /// A protobuf that reads as an ONNX ModelProto: ir_version 8, a
    /// producer name, a graph of `graph` bytes (not a valid graph: the
    /// check looks no further) and an opset import.
    fn fake_onnx(graph: &[u8]) -> Vec<u8> {
        let mut b = vec![0x08, 0x08, 0x12, 0x04];
        b.extend_from_slice(b"test");
        b.push(0x3a);
        b.push(graph.len() as u8);
        b.extend_from_slice(graph);
        b.extend_from_slice(&[0x42, 0x02, 0x10, 0x0b]);
        b
    }

    /// The model `extract_model` finds.
    fn extract(bytes: &[u8]) -> Result<Cow<'_, [u8]>, ArchiveError> {
        extract_model(bytes).map(|(_, model)| model)
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
        assert_eq!(&*extract(&model).unwrap(), &model[..]);
    }

    #[test]
    fn finds_the_model_in_a_tgz_by_content_not_name() {
        let model = fake_tflite(2);
        let archive = tgz(&[("README", b"hello"), ("weights.bin", &model)]);
        assert_eq!(&*extract(&archive).unwrap(), &model[..]);
        assert_eq!(&*extract(&gzip(&model)).unwrap(), &model[..]);
    }

    #[test]
    fn onnx_is_recognised_by_its_fields_raw_or_archived() {
        let model = fake_onnx(&[0x0a, 0x01, b'x']);
        assert_eq!(extract_model(&model).unwrap(), (Format::Onnx, Cow::Borrowed(&model[..])));
        let archive = tgz(&[("README", b"hello"), ("weights.bin", &model)]);
        assert_eq!(extract_model(&archive).unwrap(), (Format::Onnx, Cow::Owned(model.clone())));
        assert_eq!(extract_model(&gzip(&model)).unwrap().0, Format::Onnx);
        assert_eq!(extract_model(&fake_tflite(3)).unwrap().0, Format::Tflite);
        // Cut anywhere after its first field, it is still ONNX (a truncated
        // one, for the loader to report).
        for len in 2..model.len() {
            assert!(is_onnx(&model[..len]), "cut at {len}");
        }
        // A graph alone, without ir_version first, will do.
        assert!(is_onnx(&model[8..model.len() - 4]));
    }

    #[test]
    fn other_protobufs_and_bytes_are_not_onnx() {
        for bytes in [
            &b""[..],
            b"<html><body>nope</body></html>",
            b"{\"model\": 1}",
            b"PK\x03\x04 a zip",
            // ir_version as a string (wire type 2), graph as a number.
            &[0x0a, 0x01, b'x', 0x3a, 0x01, 0x00],
            &[0x38, 0x01],
            // A protobuf of fields ModelProto allows, but neither
            // ir_version first nor a graph.
            &[0x12, 0x01, b'x', 0x42, 0x00],
            // Field number 0, a group, an unknown wire type.
            &[0x00, 0x01],
            &[0x08, 0x01, 0x0b],
            &[0x08, 0x01, 0x3f],
            // A varint longer than ten bytes.
            &[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        ] {
            assert!(!is_onnx(bytes), "{bytes:?}");
        }
        assert!(!is_onnx(&fake_tflite(1)));
        assert!(!is_onnx(&gzip(&fake_onnx(&[]))));
    }

    #[test]
    fn refuses_archives_without_exactly_one_model() {
        let none = tgz(&[("a.txt", b"nothing here")]);
        assert!(matches!(extract(&none), Err(ArchiveError::NoModel)));
        let two = tgz(&[("a.tflite", &fake_tflite(1)), ("b.tflite", &fake_tflite(2))]);
        let err = extract(&two).unwrap_err();
        assert!(err.to_string().contains("a.tflite, b.tflite"), "{err}");
        // One of each kind is two models too.
        let mixed = tgz(&[("a.tflite", &fake_tflite(1)), ("b.onnx", &fake_onnx(&[]))]);
        let err = extract(&mixed).unwrap_err();
        assert_eq!(err.to_string(), "the archive holds 2 models (a.tflite, b.onnx); expected exactly one");
    }

    #[test]
    fn refuses_other_content() {
        assert!(matches!(extract(b"<html>nope</html>"), Err(ArchiveError::Unrecognised)));
        assert!(matches!(extract(&gzip(b"plain text")), Err(ArchiveError::Unrecognised)));
        let archive = tgz(&[("m.tflite", &fake_tflite(1))]);
        let truncated = &archive[..archive.len() / 2];
        assert!(matches!(extract(truncated), Err(ArchiveError::Gzip(_))));
    }
}
