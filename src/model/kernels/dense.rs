//! A dense (ungrouped) convolution for channels-last float32 images, with
//! its bias, the clamp after it and a residual sum done in the same pass.
//!
//! Pointwise (1x1) convolutions are most of a MobileNet's arithmetic. tract
//! runs them as matrix products that first copy ("pack") the activations
//! into panels; this op reads each input pixel's channels where they are and
//! multiplies them, one broadcast value at a time, into vectors of output
//! channels held in registers, as XNNPACK's kernels do. The first
//! convolution of such networks (3 input channels, 3x3) goes the same way
//! instead of through tract's padding, im2col and unfused clamp.
//!
//! It replaces the matching nodes of a decluttered graph, before tract's
//! codegen, and leaves every other case to tract.

use std::sync::Arc;

use tract_tflite::internal::tract_core::ops::binary::TypedBinOp;
use tract_tflite::internal::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_tflite::internal::tract_core::ops::einsum::EinSum;
use tract_tflite::internal::tract_core::ops::nn::DataFormat;
use tract_tflite::internal::*;

use super::fusing::{
    LANES, clamp, constant, fused_clamp, lanes, multiply_add, only_reader, round_to, store_lanes, taps,
};
use super::grid::{Grid, grid_after};

/// Output vectors summed together for the same input pixels: each input
/// value loaded is used this many times.
const WIDTH: usize = 3;

#[derive(Debug, Clone, PartialEq)]
pub struct DenseConv {
    geometry: Geometry,
    /// The weights by blocks of `WIDTH` output vectors (fewer in the last
    /// block), each `[kernel_h][kernel_w][in_channels][block's lanes]`, zero
    /// past the last output channel.
    weights: Arc<Vec<f32>>,
    /// One per output channel, zero past the last one up to a whole vector.
    bias: Arc<Vec<f32>>,
    /// Outputs are clamped to this range; infinite bounds when no clamp was fused.
    low: f32,
    high: f32,
    /// Whether a second input of the output's shape is added after the clamp.
    residual: bool,
    /// The 8-bit grids of a quantized model (see `grid`): the clamped
    /// outputs are rounded to the first, and their sums with the residual
    /// to the second.
    grid: Option<Grid>,
    sum_grid: Option<Grid>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Geometry {
    in_channels: usize,
    out_channels: usize,
    input: (usize, usize),
    output: (usize, usize),
    kernel: (usize, usize),
    stride: (usize, usize),
    /// Padding before the first row and column.
    pad: (usize, usize),
}

impl Geometry {
    fn new(
        padding: &PaddingSpec,
        input: (usize, usize),
        (in_channels, out_channels): (usize, usize),
        kernel: (usize, usize),
        stride: (usize, usize),
    ) -> Geometry {
        let padded = padding.compute(&[input.0, input.1], &[kernel.0, kernel.1], &[1, 1], &[stride.0, stride.1]);
        Geometry {
            in_channels,
            out_channels,
            input,
            output: (padded[0].convoluted, padded[1].convoluted),
            kernel,
            stride,
            pad: (padded[0].pad_before, padded[1].pad_before),
        }
    }

    fn taps(&self) -> usize {
        self.kernel.0 * self.kernel.1
    }

    fn vectors(&self) -> usize {
        self.out_channels.div_ceil(LANES)
    }

    /// Where output pixel `p` reads its first tap, and which taps it has.
    #[inline(always)]
    fn first_tap(&self, p: usize) -> (usize, (usize, usize), (usize, usize)) {
        let (oy, ox) = (p / self.output.1, p % self.output.1);
        let ky = taps(oy, self.stride.0, self.pad.0, self.kernel.0, self.input.0);
        let kx = taps(ox, self.stride.1, self.pad.1, self.kernel.1, self.input.1);
        let (iy, ix) = (oy * self.stride.0 + ky.0 - self.pad.0, ox * self.stride.1 + kx.0 - self.pad.1);
        ((iy * self.input.1 + ix) * self.in_channels, ky, kx)
    }

    /// Where output pixels `[p, p + M)` read their first taps, if they all
    /// exist and have every tap, as `sum_block` reads them for a block.
    #[inline(always)]
    fn block<const M: usize>(&self, p: usize) -> Option<[usize; M]> {
        let full = ((0, self.kernel.0), (0, self.kernel.1));
        if p + M > self.output.0 * self.output.1 {
            return None;
        }
        let mut at = [0; M];
        for (m, at) in at.iter_mut().enumerate() {
            let (first, ky, kx) = self.first_tap(p + m);
            if (ky, kx) != full {
                return None;
            }
            *at = first;
        }
        Some(at)
    }

    /// Where tap `(y, x)` of a pixel reads, from where its first tap
    /// `first` does: the input channels of that tap's pixel follow.
    #[inline(always)]
    fn shift(&self, first: (usize, usize), (y, x): (usize, usize)) -> usize {
        ((y - first.0) * self.input.1 + (x - first.1)) * self.in_channels
    }

    /// Where the weights of tap `(y, x)` start in a block of `width` output
    /// vectors: one vector of each for every input channel follows.
    #[inline(always)]
    fn weights_at(&self, width: usize, (y, x): (usize, usize)) -> usize {
        (y * self.kernel.1 + x) * self.in_channels * width * LANES
    }
}

/// The blocks of output vectors summed together, as `(first, count)`:
/// `WIDTH` at a time, then what is left.
fn blocks(vectors: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..vectors).step_by(WIDTH).map(move |v0| (v0, (vectors - v0).min(WIDTH)))
}

// As for the depthwise op: a NaN weight only makes equal ops look different.
impl Eq for DenseConv {}

impl Op for DenseConv {
    fn name(&self) -> StaticName {
        "DenseConvNhwcF32".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?}, clamp to [{}, {}], grid {:?}, residual: {}, grid {:?}",
            self.geometry, self.low, self.high, self.grid, self.residual, self.sum_grid
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for DenseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        // A panic in here is a bug of the tool's: shown, and not blamed on the model.
        crate::model::own_op(&self.name(), || self.eval_images(inputs))
    }
}

impl DenseConv {
    fn eval_images(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let g = &self.geometry;
        let input = &inputs[0];
        let batch = input.shape()[0];
        let shape = [batch, g.output.0, g.output.1, g.out_channels];
        // SAFETY: `run` writes every channel of every output pixel.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        let src = input.try_as_plain_ram()?;
        let src = src.as_slice::<f32>()?;
        let residual = match self.residual {
            true => {
                ensure!(inputs.len() == 2 && inputs[1].shape() == shape, "residual input of another shape");
                Some(inputs[1].try_as_plain_ram()?)
            }
            false => None,
        };
        let residual = residual.as_ref().map(|r| r.as_slice::<f32>()).transpose()?;
        let mut dst = output.try_as_plain_ram_mut()?;
        let dst = dst.as_slice_mut::<f32>()?;
        // What `lanes` and the unchecked reads rely on.
        ensure!(
            self.weights.len() == g.vectors() * LANES * g.taps() * g.in_channels
                && self.bias.len() == g.vectors() * LANES,
            "dense convolution weights of {} values",
            self.weights.len()
        );
        let per_image_in = g.input.0 * g.input.1 * g.in_channels;
        let per_image_out = g.output.0 * g.output.1 * g.out_channels;
        ensure!(src.len() == batch * per_image_in, "dense convolution input of shape {:?}", input.shape());
        for (image, (src, dst)) in src.chunks_exact(per_image_in).zip(dst.chunks_exact_mut(per_image_out)).enumerate() {
            let residual = residual.map(|r| &r[image * per_image_out..][..per_image_out]);
            run(self, src, dst, residual);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for DenseConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let g = &self.geometry;
        let batch = inputs[0].shape[0].clone();
        Ok(tvec!(f32::fact([batch, g.output.0.into(), g.output.1.into(), g.out_channels.into()])))
    }

    as_op!();
}

/// Runs the op on one image, with AVX-512 where this CPU has it.
fn run(op: &DenseConv, src: &[f32], dst: &mut [f32], residual: Option<&[f32]>) {
    Variant::ALL.iter().copied().find(|v| v.available()).unwrap_or(Variant::Portable).run(op, src, dst, residual)
}

/// The builds of the loops, widest first.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// The tool only plans the op where `has_vector_kernels`; the tests
    /// plan it anywhere, and get this slow but correct code.
    Portable,
}

impl Variant {
    const ALL: &[Variant] = &[
        #[cfg(target_arch = "x86_64")]
        Variant::Avx512,
        Variant::Portable,
    ];

    fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
            }
            Variant::Portable => true,
        }
    }

    /// The numbers after the vector type are how many pixels are summed at
    /// once for blocks of 3, 2 and 1 output vectors: as many as the CPU's
    /// vector registers hold sums for, with room left for the weights.
    fn run(self, op: &DenseConv, src: &[f32], dst: &mut [f32], residual: Option<&[f32]>) {
        assert!(self.available(), "{self:?} on a CPU without it");
        match self {
            // SAFETY: the CPU has the features `run_avx512` is compiled for.
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => unsafe { run_avx512(op, src, dst, residual) },
            // SAFETY: plain arrays need no CPU feature.
            Variant::Portable => unsafe { run_with::<[f32; LANES], 1, 1, 1>(op, src, dst, residual) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn run_avx512(op: &DenseConv, src: &[f32], dst: &mut [f32], residual: Option<&[f32]>) {
    use std::arch::x86_64::__m512;
    // 32 registers of 16 lanes: 24 for sums.
    // SAFETY: the features `__m512` needs are enabled here.
    unsafe { run_with::<__m512, 8, 12, 16>(op, src, dst, residual) }
}

/// `LANES` float32 values in vector registers.
///
/// # Safety
/// Every method needs the CPU features of its implementation, and `load`
/// needs `at + LANES <= data.len()`.
trait Lanes: Copy {
    unsafe fn load(data: &[f32], at: usize) -> Self;
    unsafe fn splat(x: f32) -> Self;
    /// `self * x + acc`.
    unsafe fn mul_add(self, x: Self, acc: Self) -> Self;
    unsafe fn to_array(self) -> [f32; LANES];
}

#[cfg(target_arch = "x86_64")]
impl Lanes for std::arch::x86_64::__m512 {
    #[inline(always)]
    unsafe fn load(data: &[f32], at: usize) -> Self {
        debug_assert!(at + LANES <= data.len());
        unsafe { std::arch::x86_64::_mm512_loadu_ps(data.as_ptr().add(at)) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        unsafe { std::arch::x86_64::_mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, x: Self, acc: Self) -> Self {
        unsafe { std::arch::x86_64::_mm512_fmadd_ps(self, x, acc) }
    }
    #[inline(always)]
    unsafe fn to_array(self) -> [f32; LANES] {
        unsafe { std::mem::transmute(self) }
    }
}

/// Without vector instructions the compiler gets plain arrays.
impl Lanes for [f32; LANES] {
    #[inline(always)]
    unsafe fn load(data: &[f32], at: usize) -> Self {
        unsafe { lanes(data, at) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        [x; LANES]
    }
    #[inline(always)]
    unsafe fn mul_add(self, x: Self, acc: Self) -> Self {
        std::array::from_fn(|l| multiply_add::<{ cfg!(target_arch = "aarch64") }>(self[l], x[l], acc[l]))
    }
    #[inline(always)]
    unsafe fn to_array(self) -> [f32; LANES] {
        self
    }
}

/// The loops, over blocks of output vectors and then output pixels.
///
/// # Safety
/// The CPU has the features `V` needs.
#[inline(always)]
unsafe fn run_with<V: Lanes, const M3: usize, const M2: usize, const M1: usize>(
    op: &DenseConv,
    src: &[f32],
    dst: &mut [f32],
    residual: Option<&[f32]>,
) {
    let g = &op.geometry;
    let per_vector = LANES * g.taps() * g.in_channels;
    for (v0, width) in blocks(g.vectors()) {
        let weights = &op.weights[v0 * per_vector..][..width * per_vector];
        let out = Outputs { dst: &mut *dst, residual, v0 };
        // SAFETY: as the caller promises.
        unsafe {
            match width {
                3 => pixels::<V, M3, 3>(op, src, weights, out),
                2 => pixels::<V, M2, 2>(op, src, weights, out),
                _ => pixels::<V, M1, 1>(op, src, weights, out),
            }
        }
    }
}

/// Where a block of output vectors goes.
struct Outputs<'a> {
    dst: &'a mut [f32],
    residual: Option<&'a [f32]>,
    /// The block's first output vector.
    v0: usize,
}

/// Every output pixel of the `W` output vectors whose weights are `weights`,
/// `M` pixels at a time where they all have every tap.
///
/// # Safety
/// As for `run_with`.
#[inline(always)]
unsafe fn pixels<V: Lanes, const M: usize, const W: usize>(
    op: &DenseConv,
    src: &[f32],
    weights: &[f32],
    mut out: Outputs,
) {
    let g = &op.geometry;
    let count = g.output.0 * g.output.1;
    let full = ((0, g.kernel.0), (0, g.kernel.1));
    let mut p = 0;
    while p < count {
        if let Some(at) = g.block::<M>(p) {
            // SAFETY: as the caller promises.
            let sums = unsafe { sum_block::<V, M, W>(op, src, weights, &at, out.v0, full.0, full.1) };
            store(op, &mut out, p, &sums);
            p += M;
            continue;
        }
        let (first, ky, kx) = g.first_tap(p);
        // SAFETY: as the caller promises.
        let sums = unsafe { sum_block::<V, 1, W>(op, src, weights, &[first], out.v0, ky, kx) };
        store(op, &mut out, p, &sums);
        p += 1;
    }
}

/// The sums of `W` output vectors from `v0` for `M` output pixels whose taps
/// are `ky` by `kx` and whose first tap reads at `at`.
///
/// # Safety
/// As for `run_with`; the reads are in bounds because `eval` checked the
/// sizes and `taps` keeps every pixel read inside the input.
#[inline(always)]
unsafe fn sum_block<V: Lanes, const M: usize, const W: usize>(
    op: &DenseConv,
    src: &[f32],
    weights: &[f32],
    at: &[usize; M],
    v0: usize,
    ky: (usize, usize),
    kx: (usize, usize),
) -> [[[f32; LANES]; W]; M] {
    let g = &op.geometry;
    let cin = g.in_channels;
    unsafe {
        let mut sums = [[V::splat(0.0); W]; M];
        for n in 0..W {
            let bias = V::load(&op.bias, (v0 + n) * LANES);
            for pixel in sums.iter_mut() {
                pixel[n] = bias;
            }
        }
        for y in ky.0..ky.1 {
            for x in kx.0..kx.1 {
                let shift = g.shift((ky.0, kx.0), (y, x));
                let k = g.weights_at(W, (y, x));
                for c in 0..cin {
                    let mut w = [V::splat(0.0); W];
                    for (n, w) in w.iter_mut().enumerate() {
                        *w = V::load(weights, k + (c * W + n) * LANES);
                    }
                    for (m, pixel) in sums.iter_mut().enumerate() {
                        debug_assert!(at[m] + shift + c < src.len());
                        let v = V::splat(*src.get_unchecked(at[m] + shift + c));
                        for (sums, &w) in pixel.iter_mut().zip(&w) {
                            *sums = v.mul_add(w, *sums);
                        }
                    }
                }
            }
        }
        sums.map(|pixel| pixel.map(|v| v.to_array()))
    }
}

/// Writes the sums of `M` output pixels from `p`, clamped, plus the residual.
#[inline(always)]
fn store<const M: usize, const W: usize>(op: &DenseConv, out: &mut Outputs, p: usize, sums: &[[[f32; LANES]; W]; M]) {
    let cout = op.geometry.out_channels;
    for (m, pixel) in sums.iter().enumerate() {
        for (n, sums) in pixel.iter().enumerate() {
            let c0 = (out.v0 + n) * LANES;
            let at = (p + m) * cout + c0;
            let lanes = (cout - c0).min(LANES);
            let dst = &mut out.dst[at..][..lanes];
            match (out.residual, op.grid.or(op.sum_grid)) {
                (Some(residual), None) => {
                    for ((o, &s), &r) in dst.iter_mut().zip(sums).zip(&residual[at..][..lanes]) {
                        *o = clamp(s, op.low, op.high) + r;
                    }
                }
                // A quantized model's: one loop, in which the compiler
                // unswitches the two tests.
                (Some(residual), Some(_)) => {
                    for ((o, &s), &r) in dst.iter_mut().zip(sums).zip(&residual[at..][..lanes]) {
                        *o = round_to(op.sum_grid, round_to(op.grid, clamp(s, op.low, op.high)) + r);
                    }
                }
                (None, _) => store_lanes(dst, sums, op.low, op.high, op.grid),
            }
        }
    }
}

/// Whether this CPU runs [`DenseConv`] with the vector instructions it was
/// measured with: AVX-512. Elsewhere tract's own matrix products, written
/// for that CPU, stay (with AVX2 the op was slower than with AVX-512 by half,
/// and tract's AVX2 kernels could not be measured on the same machine).
pub fn has_vector_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Replaces each dense convolution of a decluttered float32 channels-last
/// graph that this module can run (a `Conv` of one group, or the `EinSum`
/// a 1x1 convolution becomes), with the bias, clamp and residual sum that
/// follow it, by one [`DenseConv`]. Returns how many it replaced.
pub fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in model.eval_order()? {
        let Some(found) = dense_at(model, id)? else { continue };
        let node = model.node(id);
        let mut patch = TypedModelPatch::default();
        let mut inputs = tvec![patch.tap_model(model, node.inputs[0])?];
        if let Some(residual) = found.residual {
            inputs.push(patch.tap_model(model, residual)?);
        }
        let wire = patch.wire_node(&node.name, found.op, &inputs)?[0];
        patch.shunt_outside(model, found.last, wire)?;
        patch.apply(model)?;
        fused += 1;
    }
    Ok(fused)
}

/// A dense convolution this module can run, with what follows it.
struct Found {
    /// The op that replaces the convolution and the nodes it takes in.
    op: DenseConv,
    /// The op's second input, when it takes in a residual sum.
    residual: Option<OutletId>,
    /// The last outlet the op replaces.
    last: OutletId,
}

/// What replaces node `id`, if it is a dense convolution this module can run.
fn dense_at(model: &TypedModel, id: usize) -> TractResult<Option<Found>> {
    let node = model.node(id);
    let Some((geometry, kernel, bias)) =
        conv_at(model, node)?.map_or_else(|| einsum_at(model, node), |c| Ok(Some(c)))?
    else {
        return Ok(None);
    };
    let g = geometry;
    // Empty tensors are tract's to handle.
    if [g.input.0, g.input.1, g.in_channels, g.out_channels, g.output.0, g.output.1].contains(&0) {
        return Ok(None);
    }
    let mut last = OutletId::new(id, 0);
    let bias = match bias {
        Some(bias) => bias,
        None => match bias_after(model, last, g.out_channels)? {
            Some((bias, after)) => {
                last = after;
                bias
            }
            None => vec![0.0; g.out_channels],
        },
    };
    let (low, high, after) = fused_clamp(model, last)?;
    last = after;
    let grid = grid_after(model, last).map(|(grid, after)| {
        last = after;
        grid
    });
    let residual = residual_after(model, last)?;
    if let Some((_, after)) = residual {
        last = after;
    }
    let sum_grid = residual.and_then(|_| grid_after(model, last)).map(|(grid, after)| {
        last = after;
        grid
    });
    let mut padded_bias = bias;
    padded_bias.resize(g.vectors() * LANES, 0.0);
    let op = DenseConv {
        geometry,
        weights: Arc::new(pack(&g, &kernel)),
        bias: Arc::new(padded_bias),
        low,
        high,
        residual: residual.is_some(),
        grid,
        sum_grid,
    };
    Ok(Some(Found { op, residual: residual.map(|r| r.0), last }))
}

/// The weights, `[out][kernel_h][kernel_w][in]`, in the blocks `sum_block` reads.
fn pack(g: &Geometry, kernel: &[f32]) -> Vec<f32> {
    let (taps, cin, cout) = (g.taps(), g.in_channels, g.out_channels);
    let mut packed = Vec::with_capacity(g.vectors() * LANES * taps * cin);
    for (v0, width) in blocks(g.vectors()) {
        for t in 0..taps {
            for c in 0..cin {
                for lane in 0..width * LANES {
                    let o = v0 * LANES + lane;
                    packed.push(if o < cout { kernel[(o * taps + t) * cin + c] } else { 0.0 });
                }
            }
        }
    }
    packed
}

/// A float32 NHWC `Conv` of one group with constant weights and bias.
#[allow(clippy::type_complexity)]
fn conv_at(model: &TypedModel, node: &TypedNode) -> TractResult<Option<(Geometry, Vec<f32>, Option<Vec<f32>>)>> {
    let Some(conv) = node.op_as::<Conv>() else { return Ok(None) };
    let spec = &conv.pool_spec;
    let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&d| d == 1));
    if conv.q_params.is_some()
        || conv.kernel_fmt != KernelFormat::OHWI
        || spec.data_format != DataFormat::NHWC
        || conv.group != 1
        || spec.kernel_shape.len() != 2
        || !ones(&spec.dilations)
        || node.inputs.len() != 3
        || matches!(spec.padding, PaddingSpec::ExplicitOnnxPool(..))
    {
        return Ok(None);
    }
    let (cin, cout) = (spec.input_channels, spec.output_channels);
    let fact = model.outlet_fact(node.inputs[0])?;
    let Some(&[_, h, w, channels]) = fact.shape.as_concrete() else { return Ok(None) };
    if fact.datum_type != f32::datum_type() || channels != cin {
        return Ok(None);
    }
    let (Some(kernel), Some(bias)) = (constant(model, node.inputs[1])?, constant(model, node.inputs[2])?) else {
        return Ok(None);
    };
    let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
    if kernel.shape() != [cout, kh, kw, cin] || bias.len() != cout || bias.datum_type() != f32::datum_type() {
        return Ok(None);
    }
    let strides = spec.strides.clone().unwrap_or_else(|| tvec!(1, 1));
    let geometry = Geometry::new(&spec.padding, (h, w), (cin, cout), (kh, kw), (strides[0], strides[1]));
    let kernel = kernel.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let bias = bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    Ok(Some((geometry, kernel, Some(bias))))
}

/// The `EinSum` `NHWI,OI->NHWO` of float32 values with constant weights that
/// tract's declutter makes of a 1x1 convolution. Its bias is a separate sum.
#[allow(clippy::type_complexity)]
fn einsum_at(model: &TypedModel, node: &TypedNode) -> TractResult<Option<(Geometry, Vec<f32>, Option<Vec<f32>>)>> {
    let Some(einsum) = node.op_as::<EinSum>() else { return Ok(None) };
    if einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return Ok(None);
    }
    let (inputs, outputs) = einsum.axes.to_strs();
    let chars = |s: &str| s.chars().collect::<Vec<_>>();
    let (x, k, y) = (chars(&inputs[0]), chars(&inputs[1]), chars(&outputs[0]));
    let pointwise = x.len() == 4
        && k.len() == 2
        && y.len() == 4
        && x[..3] == y[..3]
        && x[3] == k[1]
        && k[0] == y[3]
        && x[3] != y[3]
        && !x[..3].contains(&k[0])
        && !x[..3].contains(&k[1]);
    if !pointwise {
        return Ok(None);
    }
    let fact = model.outlet_fact(node.inputs[0])?;
    let Some(&[_, h, w, cin]) = fact.shape.as_concrete() else { return Ok(None) };
    let Some(kernel) = constant(model, node.inputs[1])? else { return Ok(None) };
    if fact.datum_type != f32::datum_type() || kernel.datum_type() != f32::datum_type() || kernel.shape()[1] != cin {
        return Ok(None);
    }
    let geometry = Geometry {
        in_channels: cin,
        out_channels: kernel.shape()[0],
        input: (h, w),
        output: (h, w),
        kernel: (1, 1),
        stride: (1, 1),
        pad: (0, 0),
    };
    let kernel = kernel.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    Ok(Some((geometry, kernel, None)))
}

/// The bias after `from`: a sum with a constant of one value per output
/// channel, the only reader of `from`.
fn bias_after(model: &TypedModel, from: OutletId, channels: usize) -> TractResult<Option<(Vec<f32>, OutletId)>> {
    let Some(next) = only_reader(model, from) else { return Ok(None) };
    let node = model.node(next);
    let Some(bin) = node.op_as::<TypedBinOp>() else { return Ok(None) };
    if bin.0.name() != "Add" || bin.1.is_some() {
        return Ok(None);
    }
    let other = node.inputs.iter().find(|&&o| o != from).copied();
    let Some(bias) = other.map(|o| constant(model, o)).transpose()?.flatten() else { return Ok(None) };
    let per_channel = bias.shape().last() == Some(&channels) && bias.len() == channels;
    if !per_channel || bias.datum_type() != f32::datum_type() {
        return Ok(None);
    }
    Ok(Some((bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(), OutletId::new(next, 0))))
}

/// The residual sum after `from`: a sum with another float32 tensor of the
/// same shape, the only reader of `from`. Returns that tensor's outlet.
fn residual_after(model: &TypedModel, from: OutletId) -> TractResult<Option<(OutletId, OutletId)>> {
    let Some(next) = only_reader(model, from) else { return Ok(None) };
    let node = model.node(next);
    let Some(bin) = node.op_as::<TypedBinOp>() else { return Ok(None) };
    if bin.0.name() != "Add" || bin.1.is_some() || node.inputs.len() != 2 {
        return Ok(None);
    }
    let Some(&other) = node.inputs.iter().find(|&&o| o != from) else { return Ok(None) };
    let (ours, theirs) = (model.outlet_fact(from)?, model.outlet_fact(other)?);
    if theirs.datum_type != f32::datum_type() || theirs.shape != ours.shape || ours.shape.as_concrete().is_none() {
        return Ok(None);
    }
    Ok(Some((other, OutletId::new(next, 0))))
}

#[cfg(test)]
mod tests {
    use super::super::grid::RoundToGrid;
    use super::super::testing::{
        RELU6, assert_close, assert_on_grid, clamp, conv, conv_op, each_geometry, run, values,
    };
    use super::*;
    use tract_tflite::internal::tract_core::ops::math;

    /// The grids of a quantized model's ReLU6 output, and of a sum.
    fn relu6_grid() -> Grid {
        Grid::new(6.0 / 255.0, 0, 0, 255).unwrap()
    }
    fn sum_grid() -> Grid {
        Grid::new(0.07, 131, 0, 255).unwrap()
    }

    struct Case {
        batch: usize,
        size: (usize, usize),
        channels: (usize, usize),
        kernel: usize,
        stride: usize,
        padding: PaddingSpec,
        clamp: &'static [(&'static str, f32)],
        /// Adds the input to the output, as a residual connection does.
        residual: bool,
        /// Rounds the clamped output, and the sum, to 8-bit grids, as a
        /// quantized model's rebuild does.
        grids: bool,
    }

    impl Case {
        fn new(size: (usize, usize), channels: (usize, usize), kernel: usize, stride: usize) -> Case {
            Case {
                batch: 1,
                size,
                channels,
                kernel,
                stride,
                padding: PaddingSpec::SameUpper,
                clamp: RELU6,
                residual: false,
                grids: false,
            }
        }

        fn input(&self) -> Tensor {
            let (h, w) = self.size;
            let shape = [self.batch, h, w, self.channels.0];
            Tensor::from_shape(&shape, &values(shape.iter().product(), 3, 1.0)).unwrap()
        }
    }

    /// A convolution as tract-tflite wires one, then the clamp and the sum,
    /// decluttered as the tool does (which makes 1x1 ones an `EinSum`).
    fn graph(case: &Case) -> TypedModel {
        let (h, w) = case.size;
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([case.batch, h, w, case.channels.0])).unwrap();
        let op = conv_op(case.kernel, case.stride, case.padding.clone(), case.channels, 1);
        let mut wire = conv(&mut model, "conv", x, op);
        wire = clamp(&mut model, "conv", wire, case.clamp);
        if case.grids {
            wire = model.wire_node("conv.rounded", RoundToGrid(relu6_grid()), &[wire]).unwrap()[0];
        }
        if case.residual {
            wire = model.wire_node("residual", math::add(), &[wire, x]).unwrap()[0];
            if case.grids {
                wire = model.wire_node("residual.rounded", RoundToGrid(sum_grid()), &[wire]).unwrap()[0];
            }
        }
        model.select_output_outlets(&[wire]).unwrap();
        crate::model::declutter().optimize(&mut model).unwrap();
        model
    }

    fn run_plan(model: TypedModel, input: &Tensor) -> Vec<f32> {
        run(model, input).to_plain_array_view::<f32>().unwrap().iter().copied().collect()
    }

    /// Runs `case` through tract's own code and through this module's, on
    /// every kind of vector this CPU has, and checks they all agree.
    fn check(case: Case) {
        let input = case.input();
        let mut tract = graph(&case);
        let mut ours = tract.clone();
        tract.optimize().unwrap();
        assert_eq!(fuse(&mut ours).unwrap(), 1);
        ours.compact().unwrap();
        // Everything after the convolution went into the op.
        let ops: Vec<String> = ours.nodes().iter().map(|n| n.op.name().to_string()).collect();
        assert_eq!(ops.len(), 2, "{ops:?}");
        let op = ours.nodes().iter().find_map(|n| n.op_as::<DenseConv>()).unwrap().clone();
        assert_eq!((op.grid.is_some(), op.sum_grid.is_some()), (case.grids, case.grids && case.residual));
        // With grids, tract's convolution is followed by the tool's own
        // rounding, which its tests check against the formula.
        let close = |expected: &[f32], got: &[f32], what: &str| match (case.grids, case.residual) {
            (false, _) => assert_close(expected, got, what),
            (true, false) => assert_on_grid(expected, got, relu6_grid().step(), what),
            (true, true) => assert_on_grid(expected, got, sum_grid().step(), what),
        };
        let expected = run_plan(tract, &input);
        let mut optimized = ours.clone();
        optimized.optimize().unwrap();
        close(&expected, &run_plan(optimized, &input), "plan");

        // Each implementation on its own, one image.
        let g = op.geometry;
        let per_image_in = g.input.0 * g.input.1 * g.in_channels;
        let src = &input.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap()[..per_image_in].to_vec();
        let per_image_out = g.output.0 * g.output.1 * g.out_channels;
        let residual = case.residual.then(|| src.clone());
        for &variant in Variant::ALL {
            if !variant.available() {
                println!("{variant:?} skipped: this CPU lacks it");
                continue;
            }
            let mut dst = vec![f32::NAN; per_image_out];
            variant.run(&op, src, &mut dst, residual.as_deref());
            close(&expected[..per_image_out], &dst, &format!("{variant:?}"));
        }
    }

    /// The geometries the op meets (see `each_geometry`).
    fn geometries(channels: &[(usize, usize)]) -> Vec<Geometry> {
        each_geometry(channels, |padding, size, c, kernel, stride| {
            let g = Geometry::new(padding, size, c, kernel, stride);
            // As `dense_at`, which leaves empty outputs to tract.
            (g.output.0 > 0 && g.output.1 > 0).then_some(g)
        })
    }

    #[test]
    fn blocks_of_vectors_cover_every_vector_once() {
        for vectors in 0..40 {
            let mut next = 0;
            for (v0, width) in blocks(vectors) {
                assert!(v0 == next && (1..=WIDTH).contains(&width), "{vectors}: {v0}, {width}");
                next += width;
            }
            assert_eq!(next, vectors);
        }
    }

    #[test]
    fn every_weight_and_bias_read_is_inside_its_slice() {
        for g in geometries(&[(1, 1), (3, 16), (5, 24), (2, 56), (17, 80)]) {
            let per_vector = LANES * g.taps() * g.in_channels;
            let (weights, bias) = (g.vectors() * per_vector, g.vectors() * LANES);
            for (v0, width) in blocks(g.vectors()) {
                // `run_with` slices the block's weights out, with checks.
                assert!((v0 + width) * per_vector <= weights, "{v0} of {g:?}");
                for n in 0..width {
                    assert!((v0 + n) * LANES + LANES <= bias, "bias {v0} + {n} of {g:?}");
                }
                for (y, x) in (0..g.kernel.0).flat_map(|y| (0..g.kernel.1).map(move |x| (y, x))) {
                    let k = g.weights_at(width, (y, x));
                    // Read from k: a vector for each input channel and output vector.
                    for c in 0..g.in_channels {
                        for n in 0..width {
                            let at = k + (c * width + n) * LANES;
                            assert!(at + LANES <= width * per_vector, "{y}, {x}, {c}, {n} of {g:?}");
                        }
                    }
                }
            }
        }
    }

    /// Where output pixel `p`'s tap `(y, x)` reads, straight from the definition.
    fn input_pixel(g: &Geometry, p: usize, (y, x): (usize, usize)) -> usize {
        let (oy, ox) = (p / g.output.1, p % g.output.1);
        let (iy, ix) =
            ((oy * g.stride.0 + y) as isize - g.pad.0 as isize, (ox * g.stride.1 + x) as isize - g.pad.1 as isize);
        assert!(
            (0..g.input.0 as isize).contains(&iy) && (0..g.input.1 as isize).contains(&ix),
            "{p}, {y}, {x} of {g:?}"
        );
        (iy as usize * g.input.1 + ix as usize) * g.in_channels
    }

    /// Checks the reads of blocks of `M` pixels and of single pixels.
    fn check_input_reads<const M: usize>(g: &Geometry) {
        let (count, len) = (g.output.0 * g.output.1, g.input.0 * g.input.1 * g.in_channels);
        let read = |p: usize, at: usize, first: (usize, usize), tap: (usize, usize)| {
            let pixel = at + g.shift(first, tap);
            assert_eq!(pixel, input_pixel(g, p, tap), "{p}, {tap:?} of {g:?}");
            // `sum_block` reads the pixel's input channels from there.
            assert!(pixel + g.in_channels <= len, "{p}, {tap:?} of {g:?}");
        };
        for p in 0..count {
            let (first, ky, kx) = g.first_tap(p);
            for tap in (ky.0..ky.1).flat_map(|y| (kx.0..kx.1).map(move |x| (y, x))) {
                read(p, first, (ky.0, kx.0), tap);
            }
            if let Some(at) = g.block::<M>(p) {
                for (m, &at) in at.iter().enumerate() {
                    let full = (at, (0, g.kernel.0), (0, g.kernel.1));
                    assert_eq!(g.first_tap(p + m), full, "{p} + {m} of {g:?}");
                    for tap in (0..g.kernel.0).flat_map(|y| (0..g.kernel.1).map(move |x| (y, x))) {
                        read(p + m, at, (0, 0), tap);
                    }
                }
            }
        }
    }

    #[test]
    fn every_input_read_is_inside_the_input() {
        for g in geometries(&[(1, 16), (3, 16), (17, 16)]) {
            // The portable build's blocks, and the AVX-512 build's.
            check_input_reads::<1>(&g);
            check_input_reads::<8>(&g);
            check_input_reads::<12>(&g);
            check_input_reads::<16>(&g);
        }
    }

    #[test]
    fn a_panic_in_the_op_is_the_tools_own_and_shown() {
        let case = Case::new((4, 4), (8, 16), 3, 1);
        let mut model = graph(&case);
        assert_eq!(fuse(&mut model).unwrap(), 1);
        let plan = model.into_runnable().unwrap();
        let (outcome, quiet) = crate::model::tests::with_panic_in("DenseConvNhwcF32", || {
            crate::model::guarded(|| plan.run(tvec!(case.input().into())))
        });
        let error = outcome.unwrap_err();
        assert!(
            matches!(&error, crate::model::ModelError::Internal { op, .. } if op == "DenseConvNhwcF32"),
            "{error:?}"
        );
        assert_eq!(quiet, Some(false), "the panic hook would have hidden it");
    }

    #[test]
    fn a_first_convolution_agrees_with_tract() {
        // MobileNet's: three channels in, 32 out, 3x3, stride 2, on odd and even sizes.
        check(Case::new((9, 8), (3, 32), 3, 2));
        check(Case::new((11, 13), (3, 32), 3, 2));
    }

    #[test]
    fn other_convolutions_agree_with_tract() {
        // 24 and 56 outputs: a part vector; 56 also a block of three then one.
        let valid = Case { padding: PaddingSpec::Valid, clamp: &[], ..Case::new((7, 7), (5, 24), 3, 1) };
        check(valid);
        let explicit = PaddingSpec::Explicit(tvec!(2, 0), tvec!(0, 1));
        check(Case { padding: explicit, ..Case::new((6, 6), (4, 56), 3, 1) });
        check(Case { clamp: &[("Max", 0.0)], ..Case::new((9, 9), (2, 40), 5, 2) });
    }

    #[test]
    fn pointwise_convolutions_agree_with_tract() {
        // Expanding (9 vectors: blocks of 3) and projecting (16 + 8 lanes),
        // over more pixels than a block sums at once and a remainder.
        check(Case::new((7, 5), (24, 144), 1, 1));
        check(Case { clamp: &[], ..Case::new((5, 5), (144, 24), 1, 1) });
        check(Case { batch: 2, ..Case::new((3, 4), (16, 80), 1, 1) });
    }

    #[test]
    fn blocks_of_three_vectors_agree_with_tract_at_the_edges() {
        // 48 outputs: 8 pixels by 3 vectors at once, where every run of 8
        // pixels of a padded row holds an edge pixel.
        check(Case::new((10, 9), (5, 48), 3, 1));
    }

    #[test]
    fn a_quantized_models_rounding_is_fused_after_the_clamp_and_after_the_sum() {
        check(Case { grids: true, ..Case::new((9, 9), (3, 32), 3, 2) });
        check(Case { grids: true, ..Case::new((5, 5), (144, 24), 1, 1) });
        check(Case { grids: true, clamp: &[], ..Case::new((5, 5), (24, 40), 1, 1) });
        check(Case { grids: true, residual: true, clamp: &[], ..Case::new((4, 6), (32, 32), 1, 1) });
        check(Case { grids: true, residual: true, batch: 2, ..Case::new((5, 7), (40, 40), 3, 1) });
    }

    #[test]
    fn a_residual_sum_is_fused_after_the_clamp() {
        check(Case { residual: true, clamp: &[], ..Case::new((4, 6), (32, 32), 1, 1) });
        check(Case { residual: true, ..Case::new((5, 5), (24, 24), 3, 1) });
        check(Case { batch: 3, residual: true, ..Case::new((5, 7), (40, 40), 3, 1) });
    }

    /// Optimizes `model` with tract alone and as the tool does, checks both
    /// give the same outputs, and returns the names of the tool's plan's ops.
    fn compare_with_tract(model: TypedModel, input: &Tensor) -> Vec<String> {
        let mut tract = model.clone();
        tract.optimize().unwrap();
        let ours = crate::model::optimize(model, &[]).unwrap();
        let names = ours.nodes().iter().map(|n| n.op.name().to_string()).collect();
        let expected = tract.into_runnable().unwrap().run(tvec!(input.clone().into())).unwrap();
        let got = ours.into_runnable().unwrap().run(tvec!(input.clone().into())).unwrap();
        assert_eq!(expected.len(), got.len());
        for (e, g) in expected.iter().zip(&got) {
            assert_eq!(e.shape(), g.shape());
            let (e, g) = (e.to_plain_array_view::<f32>().unwrap(), g.to_plain_array_view::<f32>().unwrap());
            assert_close(e.as_slice().unwrap(), g.as_slice().unwrap(), "model");
        }
        names
    }

    #[test]
    fn mobilenet_blocks_run_in_the_tools_ops_through_the_whole_optimization() {
        // Two inverted residual blocks, as the tool prepares them: the
        // depthwise pass, then this one, then tract's codegen.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([2, 6, 6, 16])).unwrap();
        let mut wire = x;
        for block in 0..2 {
            let expand =
                conv(&mut model, &format!("expand{block}"), wire, conv_op(1, 1, PaddingSpec::SameUpper, (16, 48), 1));
            let expand = clamp(&mut model, &format!("expand{block}.relu6"), expand, RELU6);
            let depthwise = conv(
                &mut model,
                &format!("depthwise{block}"),
                expand,
                conv_op(3, 1, PaddingSpec::SameUpper, (48, 48), 48),
            );
            let depthwise = clamp(&mut model, &format!("depthwise{block}.relu6"), depthwise, RELU6);
            let project = conv(
                &mut model,
                &format!("project{block}"),
                depthwise,
                conv_op(1, 1, PaddingSpec::SameUpper, (48, 16), 1),
            );
            wire = model.wire_node(format!("add{block}"), math::add(), &[wire, project]).unwrap()[0];
        }
        model.select_output_outlets(&[wire]).unwrap();
        let names =
            compare_with_tract(model, &Tensor::from_shape(&[2, 6, 6, 16], &values(2 * 6 * 6 * 16, 6, 1.0)).unwrap());
        let count = |name: &str| names.iter().filter(|n| *n == name).count();
        assert_eq!(count("DepthwiseConvNhwcF32"), 2, "{names:?}");
        if has_vector_kernels() {
            // Source, and three ops a block: nothing of tract's left.
            assert_eq!(count("DenseConvNhwcF32"), 4, "{names:?}");
            assert_eq!(names.len(), 7, "{names:?}");
        }
    }

    #[test]
    fn what_else_reads_or_does_not_fit_is_left_to_tract() {
        // The convolution's output is also the model's: its clamp stays out.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 4, 4, 8])).unwrap();
        let c = conv(&mut model, "c", x, conv_op(1, 1, PaddingSpec::SameUpper, (8, 16), 1));
        let clamped = clamp(&mut model, "c.relu6", c, RELU6);
        model.select_output_outlets(&[clamped, c]).unwrap();
        let input = Tensor::from_shape(&[1, 4, 4, 8], &values(128, 7, 1.0)).unwrap();
        let names = compare_with_tract(model, &input);
        if has_vector_kernels() {
            assert!(names.iter().any(|n| n.contains("DenseConv")), "{names:?}");
            assert!(names.iter().any(|n| n.contains("Max") || n.contains("Min") || n.contains("Bin")), "{names:?}");
        }

        // A sum with a constant that varies along the width is not a bias.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 4, 4, 8])).unwrap();
        let c = conv(&mut model, "c", x, conv_op(1, 1, PaddingSpec::SameUpper, (8, 4), 1));
        let across = model.add_const("across", Tensor::from_shape(&[1, 1, 4, 1], &values(4, 8, 1.0)).unwrap()).unwrap();
        let sum = model.wire_node("sum", math::add(), &[c, across]).unwrap()[0];
        model.select_output_outlets(&[sum]).unwrap();
        compare_with_tract(model, &input);
    }
}
