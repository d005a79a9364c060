//! TFLite model metadata: what a model says of itself beside its graph.
//!
//! The model's `metadata` entry named `TFLITE_METADATA` points at a buffer
//! holding a `ModelMetadata` flatbuffer (tflite-support's
//! `metadata_schema.fbs`, file identifier `M001`). Two things in it change
//! how an image classifier is run, and only those are read:
//!
//! - the input's `NormalizationOptions`, `input = (pixel - mean) / std` per
//!   channel, in its process units;
//! - the output's associated files of type `TENSOR_AXIS_LABELS`: the label
//!   file, kept in the zip appended to the model (`super::zip`).
//!
//! tract-tflite has no generated code for this schema, so the few tables
//! read are declared here by hand, field ids taken from the schema. The bytes
//! are untrusted: the buffer is checked by the `flatbuffers` verifier for
//! exactly the fields read before any is read (the tables' accessors rely on
//! that, as generated code does), and every value read is checked too. A
//! metadata that is present but malformed is an error, never skipped: it
//! would otherwise change the answers silently.

use flatbuffers::{Follow, ForwardsUOffset, InvalidFlatbuffer, Table, VOffsetT, Vector, Verifiable, Verifier};
use tract_tflite::tflite;

use super::MeanStd;

/// The name of the model's metadata entry that holds the `ModelMetadata`.
const METADATA_NAME: &str = "TFLITE_METADATA";
const FILE_IDENTIFIER: &str = "M001";
/// `AssociatedFileType::TENSOR_AXIS_LABELS`.
const TENSOR_AXIS_LABELS: i8 = 2;
/// `ProcessUnitOptions::NormalizationOptions`.
const NORMALIZATION_OPTIONS: u8 = 1;

/// What the metadata says of how to run the model as an image classifier.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    /// The input's normalization, if the metadata gives one.
    pub normalization: Option<MeanStd>,
    /// The name, in the appended zip, of the output's label file.
    pub labels: Option<String>,
}

/// Reads the metadata of `model`, if it has any.
pub(super) fn read(model: &tflite::Model<'_>) -> Result<Option<Metadata>, String> {
    let Some(entries) = model.metadata() else { return Ok(None) };
    let Some(entry) = entries.iter().find(|m| m.name() == Some(METADATA_NAME)) else { return Ok(None) };
    let index = entry.buffer() as usize;
    let buffers = model.buffers().ok_or("the model has no buffers")?;
    if index >= buffers.len() {
        return Err(format!("{METADATA_NAME} names buffer {index} of {}", buffers.len()));
    }
    let bytes = buffers.get(index).data().map(|d| d.bytes()).unwrap_or_default();
    parse(bytes).map(Some)
}

/// Reads a `ModelMetadata` flatbuffer.
pub(super) fn parse(bytes: &[u8]) -> Result<Metadata, String> {
    if bytes.len() < 8 || !flatbuffers::buffer_has_identifier(bytes, FILE_IDENTIFIER, false) {
        return Err(format!("{METADATA_NAME} is not a ModelMetadata flatbuffer (no identifier {FILE_IDENTIFIER})"));
    }
    let root = flatbuffers::root::<ModelMetadata>(bytes).map_err(|e| format!("{METADATA_NAME}: {e}"))?;
    let Some(subgraph) = root.subgraphs().and_then(|s| s.iter().next()) else { return Ok(Metadata::default()) };
    let input = subgraph.inputs().and_then(|t| t.iter().next());
    let output = subgraph.outputs().and_then(|t| t.iter().next());
    Ok(Metadata { normalization: input.map(normalization).transpose()?.flatten(), labels: output.and_then(label_file) })
}

/// The first NormalizationOptions among the input's process units.
fn normalization(input: TensorMetadata<'_>) -> Result<Option<MeanStd>, String> {
    let Some(units) = input.process_units() else { return Ok(None) };
    let Some(options) = units.iter().find_map(|unit| unit.normalization()) else { return Ok(None) };
    let options = options?;
    let values = |values: Option<Vector<'_, f32>>, what: &str| {
        let values = values.map(|v| v.iter().collect::<Vec<f32>>());
        values.ok_or_else(|| format!("the input's NormalizationOptions have no {what}"))
    };
    let (mean, std) = (values(options.mean(), "mean")?, values(options.std(), "std")?);
    MeanStd::new(&mean, &std).map(Some).map_err(|e| format!("the input's NormalizationOptions: {e}"))
}

/// The output's label file: among its files of type TENSOR_AXIS_LABELS,
/// the English one where locales are given, else the first (the schema's
/// default).
fn label_file(output: TensorMetadata<'_>) -> Option<String> {
    let files = output.files()?;
    let labels: Vec<AssociatedFile<'_>> = files.iter().filter(|f| f.kind() == Some(TENSOR_AXIS_LABELS)).collect();
    let english = |f: &&AssociatedFile<'_>| {
        let locale = f.locale().unwrap_or("");
        locale.eq_ignore_ascii_case("en") || locale.get(..3).is_some_and(|l| l.eq_ignore_ascii_case("en-"))
    };
    let chosen = labels.iter().find(english).or(labels.first())?;
    chosen.name().filter(|n| !n.is_empty()).map(str::to_string)
}

/// Declares a table of the metadata schema: a newtype over a flatbuffers
/// table, with the slots (vtable offsets, `4 + 2 * field id`) it reads, and
/// a verifier of exactly those fields.
/// Declares a table of the metadata schema: a newtype over a flatbuffers
/// table, an accessor for each field read (its slot in the vtable is
/// `4 + 2 * field id`), and a verifier of exactly those fields, with the
/// types the accessors read them as.
macro_rules! table {
    ($name:ident) => {
        #[derive(Clone, Copy)]
        struct $name<'a>(Table<'a>);

        impl<'a> Follow<'a> for $name<'a> {
            type Inner = $name<'a>;
            unsafe fn follow(buf: &'a [u8], loc: usize) -> Self::Inner {
                // SAFETY: called by flatbuffers on a verified buffer, at a
                // position the verifier checked holds this table.
                $name(unsafe { Table::new(buf, loc) })
            }
        }
    };
    ($name:ident { $($field:ident = $slot:literal: $ty:ty),* $(,)? }) => {
        table!($name);

        impl<'a> $name<'a> {
            $(
                fn $field(&self) -> Option<<$ty as Follow<'a>>::Inner> {
                    // SAFETY: the buffer was verified (`parse` goes through
                    // `flatbuffers::root`) with this field of this type.
                    unsafe { self.0.get::<$ty>($slot, None) }
                }
            )*
        }

        impl<'a> Verifiable for $name<'a> {
            fn run_verifier(v: &mut Verifier<'_, '_>, pos: usize) -> Result<(), InvalidFlatbuffer> {
                let table = v.visit_table(pos)?;
                $(let table = table.visit_field::<$ty>(stringify!($field), $slot, false)?;)*
                table.finish();
                Ok(())
            }
        }
    };
}

table!(ModelMetadata { subgraphs = 10: ForwardsUOffset<Vector<'a, ForwardsUOffset<SubGraphMetadata<'a>>>> });
table!(SubGraphMetadata {
    inputs = 8: ForwardsUOffset<Vector<'a, ForwardsUOffset<TensorMetadata<'a>>>>,
    outputs = 10: ForwardsUOffset<Vector<'a, ForwardsUOffset<TensorMetadata<'a>>>>,
});
table!(TensorMetadata {
    process_units = 12: ForwardsUOffset<Vector<'a, ForwardsUOffset<ProcessUnit<'a>>>>,
    files = 16: ForwardsUOffset<Vector<'a, ForwardsUOffset<AssociatedFile<'a>>>>,
});
table!(AssociatedFile {
    name = 4: ForwardsUOffset<&'a str>,
    kind = 8: i8,
    locale = 10: ForwardsUOffset<&'a str>,
});
table!(NormalizationOptions {
    mean = 4: ForwardsUOffset<Vector<'a, f32>>,
    std = 6: ForwardsUOffset<Vector<'a, f32>>,
});
table!(ProcessUnit);

impl<'a> ProcessUnit<'a> {
    const OPTIONS_TYPE: VOffsetT = 4;
    const OPTIONS: VOffsetT = 6;

    /// The options, if they are NormalizationOptions.
    fn normalization(&self) -> Option<Result<NormalizationOptions<'a>, String>> {
        // SAFETY: verified as a u8 (the union's type), below.
        let kind = unsafe { self.0.get::<u8>(Self::OPTIONS_TYPE, None) };
        if kind != Some(NORMALIZATION_OPTIONS) {
            return None;
        }
        // SAFETY: verified as NormalizationOptions when the type says so, below.
        let options = unsafe { self.0.get::<ForwardsUOffset<NormalizationOptions<'a>>>(Self::OPTIONS, None) };
        Some(options.ok_or_else(|| "the input's NormalizationOptions are missing".to_string()))
    }
}

/// A union: its type and its value are checked together; only
/// NormalizationOptions values are ever read.
impl Verifiable for ProcessUnit<'_> {
    fn run_verifier(v: &mut Verifier<'_, '_>, pos: usize) -> Result<(), InvalidFlatbuffer> {
        v.visit_table(pos)?
            .visit_union::<u8, _>(
                "options_type",
                ProcessUnit::OPTIONS_TYPE,
                "options",
                ProcessUnit::OPTIONS,
                false,
                |key, v, pos| match key {
                    NORMALIZATION_OPTIONS => ForwardsUOffset::<NormalizationOptions<'_>>::run_verifier(v, pos),
                    _ => Ok(()),
                },
            )?
            .finish();
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Writes `ModelMetadata` flatbuffers, for the tests and the fixtures'
    //! generator alike.

    use flatbuffers::{FlatBufferBuilder, WIPOffset};

    /// A label file the output names: (name, locale).
    pub struct File<'s> {
        pub name: &'s str,
        pub locale: Option<&'s str>,
        pub ty: i8,
    }

    /// A `ModelMetadata` with one subgraph, whose input has `normalization`
    /// (mean, std) and whose output has `files`.
    pub fn metadata(normalization: Option<(&[f32], &[f32])>, files: &[File<'_>]) -> Vec<u8> {
        let mut fb = FlatBufferBuilder::new();
        let units = normalization.map(|(mean, std)| {
            let (mean, std) = (fb.create_vector(mean), fb.create_vector(std));
            let start = fb.start_table();
            fb.push_slot_always(4, mean);
            fb.push_slot_always(6, std);
            let options = fb.end_table(start);
            let start = fb.start_table();
            fb.push_slot_always::<u8>(4, 1);
            fb.push_slot_always(6, options);
            let unit = fb.end_table(start);
            fb.create_vector(&[unit])
        });
        let files: Vec<WIPOffset<_>> = files
            .iter()
            .map(|f| {
                let name = fb.create_string(f.name);
                let locale = f.locale.map(|l| fb.create_string(l));
                let start = fb.start_table();
                fb.push_slot_always(4, name);
                fb.push_slot_always::<i8>(8, f.ty);
                if let Some(locale) = locale {
                    fb.push_slot_always(10, locale);
                }
                fb.end_table(start)
            })
            .collect();
        let files = fb.create_vector(&files);
        let tensor = |fb: &mut FlatBufferBuilder<'_>, units, files| {
            let start = fb.start_table();
            if let Some(units) = units {
                fb.push_slot_always(12, units);
            }
            if let Some(files) = files {
                fb.push_slot_always(16, files);
            }
            fb.end_table(start)
        };
        let input = tensor(&mut fb, units, None);
        let output = tensor(&mut fb, None, Some(files));
        let (inputs, outputs) = (fb.create_vector(&[input]), fb.create_vector(&[output]));
        let start = fb.start_table();
        fb.push_slot_always(8, inputs);
        fb.push_slot_always(10, outputs);
        let subgraph = fb.end_table(start);
        let subgraphs = fb.create_vector(&[subgraph]);
        let name = fb.create_string("a test model");
        let start = fb.start_table();
        fb.push_slot_always(4, name);
        fb.push_slot_always(10, subgraphs);
        let root = fb.end_table(start);
        fb.finish(root, Some("M001"));
        fb.finished_data().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{File, metadata};
    use super::*;

    fn birds_like() -> Vec<u8> {
        metadata(
            Some((&[127.5], &[127.5])),
            &[
                File { name: "ids.txt", locale: None, ty: 2 },
                File { name: "readme.txt", locale: Some("en"), ty: 1 },
                File { name: "labels-en.txt", locale: Some("en"), ty: 2 },
            ],
        )
    }

    #[test]
    fn reads_the_normalization_and_the_english_label_file() {
        let read = parse(&birds_like()).unwrap();
        assert_eq!(read.normalization, Some(MeanStd { mean: [127.5; 3], std: [127.5; 3] }));
        assert_eq!(read.labels.as_deref(), Some("labels-en.txt"));
    }

    #[test]
    fn per_channel_values_and_the_first_label_file_without_locales() {
        let files = [File { name: "a.txt", locale: None, ty: 2 }, File { name: "b.txt", locale: Some("fr"), ty: 2 }];
        let read = parse(&metadata(Some((&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0])), &files)).unwrap();
        assert_eq!(read.normalization, Some(MeanStd { mean: [1.0, 2.0, 3.0], std: [4.0, 5.0, 6.0] }));
        assert_eq!(read.labels.as_deref(), Some("a.txt"));
        let read = parse(&metadata(None, &[File { name: "vocab.txt", locale: None, ty: 5 }])).unwrap();
        assert_eq!(read, Metadata::default());
    }

    #[test]
    fn bad_values_are_errors_that_say_what() {
        let err = parse(&metadata(Some((&[1.0, 2.0], &[1.0])), &[])).unwrap_err();
        assert!(err.contains("NormalizationOptions") && err.contains("2 values"), "{err}");
        let err = parse(&metadata(Some((&[0.0], &[0.0])), &[])).unwrap_err();
        assert!(err.contains("std") && err.contains("0"), "{err}");
        let err = parse(&metadata(Some((&[f32::NAN], &[1.0])), &[])).unwrap_err();
        assert!(err.contains("mean"), "{err}");
        assert!(parse(b"garbage!").unwrap_err().contains("M001"));
    }

    #[test]
    fn truncated_or_corrupt_metadata_fails_without_panicking() {
        let good = birds_like();
        for len in 0..good.len() {
            assert!(parse(&good[..len]).is_err(), "cut at {len} bytes, it was accepted");
        }
        let mut changed = 0;
        for at in 0..good.len() {
            for flip in [0x01u8, 0x10, 0x80, 0xff] {
                let mut corrupt = good.clone();
                corrupt[at] ^= flip;
                // Either an error or a reading, never a panic or a wild read.
                if parse(&corrupt).map_or(true, |m| m != parse(&good).unwrap()) {
                    changed += 1;
                }
            }
        }
        assert!(changed > good.len(), "only {changed} corruptions noticed");
    }
}
