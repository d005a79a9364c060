//! The model stage: from the bytes of a TFLite or ONNX file (raw or in a
//! gzip'd tar) to an optimized tract plan that classifies batches of images.
//!
//! The two formats differ only in how the graph reaches tract (a TFLite file
//! is rebuilt as float32 and cut into stages, `tflite`; an ONNX one is read
//! as it is, `onnx`): from there on one `Model` and one `Session` serve both.

mod integer;
mod kernels;
mod onnx;
pub mod tflite;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tract_tflite::internal::tract_core::optim::Optimizer;
use tract_tflite::prelude::*;

use kernels::grid::{self, Grid};
use kernels::{dense, depthwise};
pub use tflite::archive::{Format, extract_model};
use tflite::{self as dequantize, archive};
pub use tflite::{DequantizeError, EmbeddedFile, MeanStd, Normalization};

/// Why a model could not be prepared or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    #[error(transparent)]
    Dequantize(#[from] DequantizeError),
    #[error("the model is not an image classifier: {0}")]
    NotAClassifier(String),
    #[error("tract could not load the model: {0:#}")]
    Tract(TractError),
    /// An ONNX file tract cannot take, with the reason.
    #[error("{0}")]
    Onnx(String),
    #[error("the model is inconsistent: {0}")]
    Inconsistent(String),
    /// A panic in the tool's own code run inside tract: a bug, not a bad model.
    #[error("internal error in the tool's own {op} op: {message}")]
    Internal { op: String, message: String },
}

thread_local! {
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside tract code run on untrusted model bytes,
/// where a panic is caught and becomes an error: a panic hook can stay quiet.
pub fn panic_is_guarded() -> bool {
    GUARDED.get()
}

/// Runs tract on a rebuilt model. The rebuild checks what it reads, but
/// tract trusts every shape it is given and some inconsistent ones make it
/// panic: such a panic is caught here and reported as a bad model.
fn guarded<T>(f: impl FnOnce() -> TractResult<T>) -> Result<T, ModelError> {
    let outer = GUARDED.replace(true);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.set(outer);
    match outcome {
        Ok(result) => result.map_err(ModelError::Tract),
        Err(payload) => match payload.downcast::<OwnOpPanic>() {
            Ok(own) => Err(ModelError::Internal { op: own.op, message: own.message }),
            Err(payload) => {
                Err(ModelError::Inconsistent(panic_message(&*payload).unwrap_or_else(|| "tract failed".into())))
            }
        },
    }
}

/// What a panic in one of the tool's own ops becomes on its way out through
/// tract, so that `guarded` can tell it from one of tract's.
struct OwnOpPanic {
    op: String,
    message: String,
}

/// Runs `eval`, the body of the tool's own op `op`, outside the guard: a
/// panic there is a bug in the tool, which the panic hook must show, and
/// which must not be reported as a bad model.
fn own_op<T>(op: &str, eval: impl FnOnce() -> T) -> T {
    let outer = GUARDED.replace(false);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        #[cfg(test)]
        tests::panic_if_asked(op);
        eval()
    }));
    GUARDED.set(outer);
    match outcome {
        Ok(value) => value,
        // `resume_unwind` does not call the hook again: it has shown the
        // panic already.
        Err(payload) if outer => {
            let message = panic_message(&*payload).unwrap_or_else(|| "no message".into());
            std::panic::resume_unwind(Box::new(OwnOpPanic { op: op.to_string(), message }))
        }
        // Outside the guard, callers get the panic as it was.
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// The message of a panic raised by `panic!` and its kin.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned())
}

/// How a quantized model's arithmetic is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Arithmetic {
    /// As its authors ran it: in 8-bit integers (`integer`), or where the
    /// graph has an op the integer steps lack, in float32 with every
    /// activation the file quantizes rounded to its 8-bit grid, as the
    /// quantized runtime rounds it. A float model has none to round.
    #[default]
    Quantized,
    /// In float32, every activation the file quantizes rounded to its grid:
    /// what `Quantized` falls back to, chosen outright.
    Rounded,
    /// In float32 throughout, the activations unrounded.
    Float,
}

/// What a model expects as input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputSpec {
    pub width: u32,
    pub height: u32,
    pub layout: Layout,
    pub channels: Channels,
    pub normalization: Normalization,
}

impl InputSpec {
    /// Bytes of one image at the model's size, as 8-bit RGB.
    pub fn image_bytes(&self) -> usize {
        self.width as usize * self.height as usize * 3
    }
}

/// Where the colour channels are in the model's input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[1, height, width, 3]`, TFLite's convention.
    Nhwc,
    /// `[1, 3, height, width]`, ONNX's (PyTorch's) convention.
    Nchw,
}

/// The order of the colour channels the model was trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Channels {
    #[default]
    Rgb,
    /// As OpenCV and Caffe read images.
    Bgr,
}

/// A classifier ready to run: optimized once, shared by every worker. The
/// network may be cut into stages (see [`Model::from_bytes`]), run one after
/// the other on each image.
pub struct Model {
    plan: Plan,
    input: InputSpec,
    classes: usize,
    probabilities: bool,
    labels: Option<EmbeddedFile>,
    format: Format,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plan = match &self.plan {
            Plan::Tract(stages) => format!("{} tract stages", stages.len()),
            Plan::Integer(network) => format!("{} integer steps", network.steps.len()),
        };
        f.debug_struct("Model")
            .field("input", &self.input)
            .field("classes", &self.classes)
            .field("plan", &plan)
            .finish()
    }
}

/// What runs the network.
enum Plan {
    /// tract, on a float32 graph cut into stages run one after the other.
    Tract(Vec<Arc<TypedRunnableModel>>),
    /// The tool's own integer steps, for a quantized TFLite model.
    Integer(Arc<integer::Network>),
}

impl Model {
    /// Prepares a model from the bytes of a `.tflite` or `.onnx` file or of
    /// a gzip'd tar holding exactly one, on up to `threads` threads.
    ///
    /// tract prepares a graph on one thread, in a time that grows faster than
    /// the graph. So the network is cut into twice as many stages as there
    /// are threads, of about equal cost, and the threads take them in turn.
    /// Running the stages one after the other costs nothing measurable (see
    /// BENCHMARKS.md).
    pub fn from_bytes(bytes: &[u8], threads: usize) -> Result<Model, ModelError> {
        Model::load(bytes, threads, None, Arithmetic::default())
    }

    /// As [`Model::from_bytes`], with pixels normalized as `given` rather
    /// than as the model says (its metadata, its input's quantization, or
    /// the MobileNet guess for a float input that says nothing), and with
    /// the arithmetic given.
    pub fn load(
        bytes: &[u8],
        threads: usize,
        given: Option<MeanStd>,
        arithmetic: Arithmetic,
    ) -> Result<Model, ModelError> {
        let started = Instant::now();
        let (format, file) = extract_model(bytes)?;
        if format == Format::Onnx {
            return Model::from_onnx(&file, given, started);
        }
        if arithmetic == Arithmetic::Quantized {
            match dequantize::integer(&file, given)? {
                Ok(model) => return Model::from_integer(model, started),
                Err(why) => tracing::debug!("the model runs in float32, rounded as the quantized one: {why}"),
            }
        }
        let grids = arithmetic != Arithmetic::Float;
        let mut float = dequantize::dequantize(&file, threads.max(1).saturating_mul(2), given, grids)?;
        let (probabilities, labels) = (float.probabilities, float.labels.take());
        let grids = &float.grids;
        let prepare = |index: usize| {
            let stage = float.stage(index);
            guarded(move || {
                let tflite = tract_tflite::tflite();
                let proto = tflite.proto_model_for_read(&mut stage.bytes())?;
                // tract reads a copy: dropping ours first lets the tensors
                // tract copies out of its own reuse our memory.
                drop(stage);
                let model = tflite.model_for_proto_model(&proto)?;
                drop(proto);
                optimize(model, grids)?.into_runnable()
            })
        };
        let count = float.stages();
        let next = AtomicUsize::new(0);
        let work = || {
            let mut done = vec![];
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    return done;
                }
                done.push((index, prepare(index)));
            }
        };
        let mut prepared = std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..threads.min(count)).map(|_| scope.spawn(work)).collect();
            let mut prepared = work();
            for helper in helpers {
                // A panic outside tract leaves its stages missing: caught below.
                prepared.extend(helper.join().unwrap_or_default());
            }
            prepared
        });
        if prepared.len() != count {
            return Err(ModelError::Inconsistent("a stage of the model could not be prepared".into()));
        }
        prepared.sort_by_key(|(index, _)| *index);
        let stages = prepared.into_iter().map(|(_, stage)| stage).collect::<Result<Vec<_>, _>>()?;
        // A stage's input takes the shape the file declares for the tensor
        // between two stages; what computes it may disagree.
        for (k, pair) in stages.windows(2).enumerate() {
            let (given, taken) = (pair[0].model().output_fact(0), pair[1].model().input_fact(0));
            let fits = matches!((given, taken), (Ok(g), Ok(t)) if g.datum_type == t.datum_type && g.shape == t.shape);
            if !fits {
                return Err(ModelError::Inconsistent(format!(
                    "the tensor after stage {k} does not have the shape the file declares for it"
                )));
            }
        }
        let (input, classes) = classifier_shape(&stages, format, float.normalization)?;
        tracing::debug!(
            ms = started.elapsed().as_secs_f64() * 1e3,
            stages = stages.len(),
            grids = float.grids.len(),
            "model prepared"
        );
        Ok(Model { plan: Plan::Tract(stages), input, classes, probabilities, labels, format })
    }

    /// A quantized TFLite model planned as integer steps.
    fn from_integer(model: dequantize::IntegerModel, started: Instant) -> Result<Model, ModelError> {
        let dequantize::IntegerModel { network, normalization, probabilities, labels } = model;
        let (input, classes) = check_classifier(Layout::Nhwc, network.size, &network.output_shape, normalization)?;
        tracing::debug!(
            ms = started.elapsed().as_secs_f64() * 1e3,
            steps = network.steps.len(),
            session_bytes = network.session_bytes(),
            "integer model prepared"
        );
        Ok(Model {
            plan: Plan::Integer(Arc::new(network)),
            input,
            classes,
            probabilities,
            labels,
            format: Format::Tflite,
        })
    }

    /// Prepares an ONNX model, in one stage: tract-onnx reads the graph as
    /// it is, and there is no rebuild to cut it in.
    /// ONNX has no metadata: pixels are normalized as `given`, else as its
    /// input's type says (a uint8 input takes the pixels as they are, a
    /// float one the MobileNet guess, warned).
    fn from_onnx(bytes: &[u8], given: Option<MeanStd>, started: Instant) -> Result<Model, ModelError> {
        let (model, normalization) = onnx::load(bytes, given)?;
        let probabilities = onnx::gives_probabilities(&model);
        let stages = vec![guarded(|| optimize(model, &[])?.into_runnable())?];
        let (input, classes) = classifier_shape(&stages, Format::Onnx, normalization)?;
        tracing::debug!(ms = started.elapsed().as_secs_f64() * 1e3, "ONNX model prepared");
        Ok(Model { plan: Plan::Tract(stages), input, classes, probabilities, labels: None, format: Format::Onnx })
    }

    /// The same model reading the image's channels in `channels` order.
    pub fn with_channels(mut self, channels: Channels) -> Model {
        self.input.channels = channels;
        self
    }

    pub fn input(&self) -> InputSpec {
        self.input
    }

    /// The kind of file it was read from.
    pub fn format(&self) -> Format {
        self.format
    }

    /// How many classes the model scores.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Whether its scores already are probabilities: the graph ends in
    /// SOFTMAX or LOGISTIC (else they are logits, or anything).
    pub fn gives_probabilities(&self) -> bool {
        self.probabilities
    }

    /// The label file its metadata names for the output, from the zip
    /// appended to the model.
    pub fn embedded_labels(&self) -> Option<&EmbeddedFile> {
        self.labels.as_ref()
    }

    /// Scores a batch of images, each `input().image_bytes()` of 8-bit RGB at
    /// the model's input size, and returns one score per class per image.
    pub fn classify(&self, images: &[&[u8]]) -> anyhow::Result<Vec<Vec<f32>>> {
        let mut session = self.session()?;
        images.iter().map(|image| session.classify(image)).collect()
    }

    /// Whether it runs in the tool's own integer steps.
    pub fn runs_in_integers(&self) -> bool {
        matches!(self.plan, Plan::Integer(_))
    }

    /// A running copy of the model for one worker, which keeps its tract
    /// states or its buffers from one image to the next.
    pub fn session(&self) -> anyhow::Result<Session> {
        let runner = match &self.plan {
            Plan::Tract(stages) => {
                Runner::Tract(stages.iter().map(|stage| stage.spawn()).collect::<TractResult<Vec<_>>>()?)
            }
            Plan::Integer(network) => Runner::Integer(network.clone(), network.session()),
        };
        Ok(Session { runner, input: self.input, classes: self.classes })
    }
}

/// One worker's copy of a [`Model`]'s run-time state.
///
/// The plan is built for one image: tract gains nothing per image from
/// larger batches on this kind of network (see BENCHMARKS.md), so images
/// run one by one through the same states.
pub struct Session {
    runner: Runner,
    input: InputSpec,
    classes: usize,
}

enum Runner {
    Tract(Vec<TypedSimpleState>),
    Integer(Arc<integer::Network>, integer::Session),
}

impl Session {
    /// Scores one image of `input().image_bytes()` of 8-bit RGB at the
    /// model's input size: one score per class.
    pub fn classify(&mut self, image: &[u8]) -> anyhow::Result<Vec<f32>> {
        let per_image = self.input.image_bytes();
        anyhow::ensure!(image.len() == per_image, "image of {} bytes, the model wants {per_image}", image.len());
        let states = match &mut self.runner {
            Runner::Integer(network, session) => {
                let order = match self.input.channels {
                    Channels::Rgb => [0, 1, 2],
                    Channels::Bgr => [2, 1, 0],
                };
                return Ok(network.classify(session, image, order));
            }
            Runner::Tract(states) => states,
        };
        let input = input_tensor(&self.input, image)?;
        let mut outputs = tvec!(input.into());
        for state in states {
            outputs = guarded(|| state.run(outputs))?;
        }
        let scores = outputs[0].to_plain_array_view::<f32>()?;
        anyhow::ensure!(scores.len() == self.classes, "the model gave {} scores, not {}", scores.len(), self.classes);
        Ok(scores.iter().copied().collect())
    }
}

/// The model's input for `image`, 8-bit RGB pixels row by row: normalised,
/// its channels in the model's order and where its layout puts them. One
/// pass over the pixels, into the one buffer the tensor keeps.
fn input_tensor(spec: &InputSpec, image: &[u8]) -> anyhow::Result<Tensor> {
    let n = spec.normalization;
    // Normalized as the image's channel `c` (R, G, B), whichever the model reads it as.
    let value = |p: &[u8], c: usize| p[c] as f32 * n.scale[c] + n.offset[c];
    let (height, width) = (spec.height as usize, spec.width as usize);
    // Which of the image's channels each of the model's reads.
    let [first, second, third] = match spec.channels {
        Channels::Rgb => [0, 1, 2],
        Channels::Bgr => [2, 1, 0],
    };
    let pixels = image.chunks_exact(3);
    let tensor = match (spec.layout, spec.channels) {
        // The default, and the birds model's: a plain map, which vectorises.
        (Layout::Nhwc, Channels::Rgb) => {
            let mut data = vec![0f32; image.len()];
            for (real, p) in data.chunks_exact_mut(3).zip(pixels) {
                for (c, real) in real.iter_mut().enumerate() {
                    *real = value(p, c);
                }
            }
            tract_ndarray::Array4::from_shape_vec((1, height, width, 3), data)?.into_tensor()
        }
        (Layout::Nhwc, Channels::Bgr) => {
            let mut data = Vec::with_capacity(image.len());
            for p in pixels {
                data.extend([value(p, first), value(p, second), value(p, third)]);
            }
            tract_ndarray::Array4::from_shape_vec((1, height, width, 3), data)?.into_tensor()
        }
        (Layout::Nchw, _) => {
            let mut data = vec![0f32; image.len()];
            let (a, rest) = data.split_at_mut(height * width);
            let (b, c) = rest.split_at_mut(height * width);
            for (p, ((a, b), c)) in pixels.zip(a.iter_mut().zip(b).zip(c)) {
                (*a, *b, *c) = (value(p, first), value(p, second), value(p, third));
            }
            tract_ndarray::Array4::from_shape_vec((1, 3, height, width), data)?.into_tensor()
        }
    };
    Ok(tensor)
}

/// `shape` as the messages write shapes: `[1, 224, 224, 3]`.
fn axes(shape: &ShapeFact) -> String {
    format!("[{}]", shape.iter().map(|axis| axis.to_string()).collect::<Vec<_>>().join(", "))
}

/// tract's declutter and codegen passes, with the tool's own convolutions
/// put in between (they carry most of a MobileNet's arithmetic, and tract's
/// are slower on x86-64: see BENCHMARKS.md).
///
/// The declutter pass that moves axes around the graph is left out: on these
/// networks it only tries to drop the batch axis, which the input and output
/// pin, and each try copies the weights. It took over a third of the
/// preparation's instructions, and inference is as fast without it.
///
/// The marks of a quantized model's grids become their rounding first
/// (`grids` lists them), so that the tool's ops take it into their stores.
fn optimize(mut model: TypedModel, grids: &[Grid]) -> TractResult<TypedModel> {
    let rounded = grid::wire(&mut model, grids)?;
    declutter().optimize(&mut model)?;
    let depthwise = depthwise::fuse(&mut model)?;
    // The nodes it replaced still read what the next pass matches.
    model.compact()?;
    let dense = if dense::has_vector_kernels() { dense::fuse(&mut model)? } else { 0 };
    tracing::trace!(rounded, depthwise, dense, "convolutions replaced by the tool's own");
    model.optimize()?;
    Ok(model)
}

fn declutter() -> Optimizer {
    let mut declutter = Optimizer::declutter();
    declutter.passes.retain(|pass| format!("{pass:?}") != "ChangeAxes");
    declutter
}

/// Checks that the chain of `stages` looks like an image classifier, and
/// reads its input size and layout: `[1, H, W, 3]` or `[1, 3, H, W]` in,
/// `[1, C]`, `[C]` or `[1, 1, 1, C]` out.
///
/// An input of 3 on both axes (`[1, 3, W, 3]`) follows its format's
/// convention: channels last for TFLite, first for ONNX.
fn classifier_shape(
    stages: &[Arc<TypedRunnableModel>],
    format: Format,
    normalization: Normalization,
) -> Result<(InputSpec, usize), ModelError> {
    let not_classifier = |m: String| ModelError::NotAClassifier(m);
    let (first, last) = (stages[0].model(), stages[stages.len() - 1].model());
    if first.inputs.len() != 1 || last.outputs.len() != 1 {
        return Err(not_classifier(format!(
            "{} inputs and {} outputs, expected one of each",
            first.inputs.len(),
            last.outputs.len()
        )));
    }
    let input = first.input_fact(0).map_err(ModelError::Tract)?;
    let (layout, height, width) = match input.shape.as_concrete() {
        Some(&[1, 3, h, 3]) if format == Format::Onnx => (Layout::Nchw, h, 3),
        Some(&[1, h, w, 3]) => (Layout::Nhwc, h, w),
        Some(&[1, 3, h, w]) => (Layout::Nchw, h, w),
        _ => {
            return Err(not_classifier(format!(
                "input of shape {}, expected [1, height, width, 3] or [1, 3, height, width]",
                axes(&input.shape)
            )));
        }
    };
    let output = last.output_fact(0).map_err(ModelError::Tract)?;
    let Some(output) = output.shape.as_concrete() else {
        return Err(not_classifier(format!(
            "output of shape {}, expected [1, classes], [classes] or [1, 1, 1, classes]",
            axes(&output.shape)
        )));
    };
    check_classifier(layout, (height, width), output, normalization)
}

/// Checks an image classifier's input size and output shape, and gives its
/// input and number of classes.
fn check_classifier(
    layout: Layout,
    (height, width): (usize, usize),
    output: &[usize],
    normalization: Normalization,
) -> Result<(InputSpec, usize), ModelError> {
    let not_classifier = |m: String| ModelError::NotAClassifier(m);
    let classes = match *output {
        [c] | [1, c] | [1, 1, 1, c] if c > 0 => c,
        _ => {
            let shape = output.iter().map(|axis| axis.to_string()).collect::<Vec<_>>().join(", ");
            return Err(not_classifier(format!(
                "output of shape [{shape}], expected [1, classes], [classes] or [1, 1, 1, classes]"
            )));
        }
    };
    // The largest image decoded: a model must not make every image be
    // resized to gigapixels.
    let side = 1..=crate::image::MAX_SIDE as usize;
    if !side.contains(&height) || !side.contains(&width) {
        let max = crate::image::MAX_SIDE;
        return Err(not_classifier(format!("input of {width}x{height} pixels, expected 1x1 to {max}x{max}")));
    }
    let (width, height) = (width as u32, height as u32);
    Ok((InputSpec { width, height, layout, channels: Channels::Rgb, normalization }, classes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// The op whose next `eval` on this thread panics, for the tests.
        static PANIC_IN: Cell<Option<&'static str>> = const { Cell::new(None) };
        /// `panic_is_guarded()` as the panic hook last saw it on this thread.
        static GUARDED_IN_HOOK: Cell<Option<bool>> = const { Cell::new(None) };
    }

    pub(super) fn panic_if_asked(op: &str) {
        if PANIC_IN.get() == Some(op) {
            PANIC_IN.set(None);
            panic!("a deliberate panic in {op}");
        }
    }

    /// What `f` gave, and whether the panic hook would have stayed quiet
    /// for the last panic on this thread while it ran (`None` if none did).
    fn hook_sees<T>(f: impl FnOnce() -> T) -> (T, Option<bool>) {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let shown = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                GUARDED_IN_HOOK.set(Some(panic_is_guarded()));
                shown(info)
            }));
        });
        GUARDED_IN_HOOK.set(None);
        let value = f();
        (value, GUARDED_IN_HOOK.get())
    }

    /// As `hook_sees`, with the next `eval` of the tool's own op `op` on
    /// this thread panicking.
    pub(in crate::model) fn with_panic_in<T>(op: &'static str, f: impl FnOnce() -> T) -> (T, Option<bool>) {
        PANIC_IN.set(Some(op));
        let seen = hook_sees(f);
        assert!(PANIC_IN.replace(None).is_none(), "{op} was never evaluated");
        seen
    }

    #[test]
    fn a_panic_in_tract_is_a_bad_model_and_kept_quiet() {
        let (outcome, quiet) = hook_sees(|| guarded(|| -> TractResult<()> { panic!("bad shape") }));
        assert!(matches!(&outcome, Err(ModelError::Inconsistent(m)) if m == "bad shape"), "{outcome:?}");
        assert_eq!(quiet, Some(true));
        assert!(!panic_is_guarded());
    }

    #[test]
    fn a_panic_in_the_tools_own_op_is_shown_and_reported_as_internal() {
        let (outcome, quiet) = with_panic_in("Op", || {
            guarded(|| {
                // The guard is back on for tract after the op unwound.
                let unwound = std::panic::catch_unwind(|| own_op("Op", || ()));
                Ok((unwound.is_err(), panic_is_guarded(), own_op("Op", || 7)))
            })
        });
        assert_eq!(outcome.unwrap(), (true, true, 7));
        assert_eq!(quiet, Some(false));

        let (outcome, quiet) = with_panic_in("Op", || guarded(|| Ok(own_op("Op", || 1))));
        let error = outcome.unwrap_err();
        assert!(matches!(&error, ModelError::Internal { op, .. } if op == "Op"), "{error:?}");
        assert_eq!(error.to_string(), "internal error in the tool's own Op op: a deliberate panic in Op");
        assert_eq!(quiet, Some(false));
    }

    #[test]
    fn outside_the_guard_a_panic_in_the_tools_own_op_keeps_its_message() {
        let (outcome, _) = with_panic_in("Op", || std::panic::catch_unwind(|| own_op("Op", || ())));
        let payload = outcome.unwrap_err();
        assert_eq!(panic_message(&*payload).as_deref(), Some("a deliberate panic in Op"));
    }

    fn mock() -> Vec<u8> {
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mock_model.tflite")).unwrap()
    }

    #[test]
    fn mock_model_reads_its_shape_and_classifies() {
        let model = Model::from_bytes(&mock(), 1).unwrap();
        assert_eq!((model.input().width, model.input().height, model.classes()), (8, 8, 3));
        let red: Vec<u8> = [255, 0, 0].repeat(64);
        let blue: Vec<u8> = [0, 0, 255].repeat(64);
        let scores = model.classify(&[&red, &blue]).unwrap();
        assert!((scores[0][0] - 0.7175).abs() < 0.01, "{:?}", scores[0]);
        assert!((scores[1][2] - 0.7175).abs() < 0.01, "{:?}", scores[1]);
        assert!(model.classify(&[&red[..10]]).is_err());
    }

    fn stages(model: &Model) -> usize {
        match &model.plan {
            Plan::Tract(stages) => stages.len(),
            Plan::Integer(_) => 0,
        }
    }

    #[test]
    fn a_model_scores_alike_in_any_number_of_stages() {
        let few = Model::load(&mock(), 1, None, Arithmetic::Rounded).unwrap();
        let many = Model::load(&mock(), 2, None, Arithmetic::Rounded).unwrap();
        assert_eq!((stages(&few), stages(&many)), (2, 4));
        let images: Vec<Vec<u8>> = (0..8u8)
            .map(|k| (0..192u8).map(|i| i.wrapping_mul(31).wrapping_add(k.wrapping_mul(40))).collect())
            .collect();
        let images: Vec<&[u8]> = images.iter().map(|i| i.as_slice()).collect();
        let (a, b) = (few.classify(&images).unwrap(), many.classify(&images).unwrap());
        for (a, b) in a.iter().zip(&b) {
            assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn a_quantized_model_scores_in_its_outputs_steps_unless_asked_for_float() {
        // The mock's softmax output is uint8 with a scale of 1/256.
        let images: Vec<Vec<u8>> = (0..8u8)
            .map(|k| (0..192u8).map(|i| i.wrapping_mul(37).wrapping_add(k.wrapping_mul(29))).collect())
            .collect();
        let images: Vec<&[u8]> = images.iter().map(|i| i.as_slice()).collect();
        let quantized = Model::load(&mock(), 2, None, Arithmetic::Quantized).unwrap().classify(&images).unwrap();
        let float = Model::load(&mock(), 2, None, Arithmetic::Float).unwrap().classify(&images).unwrap();
        let on_steps = |s: &f32| (s * 256.0 - (s * 256.0).round()).abs() < 1e-4;
        assert!(quantized.iter().flatten().all(on_steps), "{quantized:?}");
        assert!(!float.iter().flatten().all(on_steps), "{float:?}");
        // The same network, only rounded.
        for (q, f) in quantized.iter().zip(&float) {
            assert!(q.iter().zip(f).all(|(q, f)| (q - f).abs() < 0.05), "{q:?} vs {f:?}");
        }
    }

    #[test]
    fn a_quantized_model_runs_in_integers_as_its_rounded_float_rebuild_does() {
        let integer = Model::load(&mock(), 2, None, Arithmetic::Quantized).unwrap();
        let rounded = Model::load(&mock(), 2, None, Arithmetic::Rounded).unwrap();
        if !kernels::integer::has_vector_kernels() {
            eprintln!("skipped: this CPU has no 8-bit dot-product instructions, and the model runs in float32");
            assert!(!integer.runs_in_integers());
            return;
        }
        assert!(integer.runs_in_integers() && !rounded.runs_in_integers());
        assert_eq!((integer.input(), integer.classes()), (rounded.input(), rounded.classes()));
        let images: Vec<Vec<u8>> = (0..32u8)
            .map(|k| (0..192u8).map(|i| i.wrapping_mul(37).wrapping_add(k.wrapping_mul(29)) ^ (k & i)).collect())
            .collect();
        let images: Vec<&[u8]> = images.iter().map(|i| i.as_slice()).collect();
        let (a, b) = (integer.classify(&images).unwrap(), rounded.classify(&images).unwrap());
        let mut same = 0;
        for (a, b) in a.iter().zip(&b) {
            // The same network: its activations may round differently where
            // float sums land within an ulp of a step's middle.
            assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 2.0 / 256.0 + 1e-6), "{a:?} vs {b:?}");
            assert!(a.iter().all(|s| (s * 256.0 - (s * 256.0).round()).abs() < 1e-4), "{a:?} off the 1/256 steps");
            same += usize::from(a == b);
        }
        assert!(same >= images.len() / 2, "only {same} of {} images scored alike", images.len());
    }

    #[test]
    fn an_integer_model_reads_bgr_as_asked() {
        let rgb = Model::load(&mock(), 1, None, Arithmetic::Quantized).unwrap();
        let bgr = Model::load(&mock(), 1, None, Arithmetic::Quantized).unwrap().with_channels(Channels::Bgr);
        let red: Vec<u8> = [255, 0, 0].repeat(64);
        let blue: Vec<u8> = [0, 0, 255].repeat(64);
        assert_eq!(rgb.classify(&[&red]).unwrap(), bgr.classify(&[&blue]).unwrap());
        assert_ne!(rgb.classify(&[&red]).unwrap(), bgr.classify(&[&red]).unwrap());
    }

    #[test]
    fn the_change_axes_pass_is_found_by_name() {
        // Should tract rename it, it would silently stay in.
        assert_eq!(declutter().passes.len() + 1, Optimizer::declutter().passes.len());
    }

    #[test]
    fn corrupt_models_fail_without_panicking() {
        let model = mock();
        for at in 0..model.len() {
            for flip in [0x01u8, 0x10, 0xff] {
                let mut corrupt = model.clone();
                corrupt[at] ^= flip;
                let outcome = std::panic::catch_unwind(|| Model::from_bytes(&corrupt, 1).map(|_| ()));
                assert!(outcome.is_ok(), "flipping {flip:#x} at byte {at} panicked");
            }
        }
    }
}
