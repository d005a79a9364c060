//! The 8-bit grid of a quantized model's activations, in the float plan.
//!
//! A quantized network is calibrated with every activation rounded to 8 bits:
//! each operator's output is `q = clamp(round(x / scale) + zero_point, qmin,
//! qmax)`, read back as `(q - zero_point) * scale`. The float rebuild drops
//! that rounding and so computes a slightly different network (on the birds
//! corpus, the top-1 of 3 photos in 200 differed from the reference runtime's,
//! and top-1 scores by up to 0.12). The rebuild marks each rounding it drops
//! (see `tflite::rewrite`); [`wire`] puts a [`RoundToGrid`] op in each
//! mark's place as tract has loaded the stage, which the depthwise and dense ops then take into their
//! stores, and which runs on its own after tract's ops.
//!
//! Rounding is to nearest, half away from zero, as TFLite's reference
//! kernels round (`RoundingDivideByPOT`). XNNPACK, which made the reference
//! outputs, rounds half to even; a float sum lands on a tie too rarely for
//! the choice to show (not measured against the other).

use tract_tflite::internal::tract_core::ops::binary::TypedBinOp;
use tract_tflite::internal::*;

use super::fusing::{clamp, only_reader};

/// Where a quantized activation's values may fall: whole steps of `scale`
/// from `low` to `high` steps (`qmin - zero_point` to `qmax - zero_point`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    scale: f32,
    /// `1 / scale`: a multiplication is cheaper than a division in the stores.
    inverse: f32,
    low: f32,
    high: f32,
}

impl Eq for Grid {}

impl Grid {
    /// The grid of a tensor quantized with `scale` and `zero_point` to the
    /// integers `[qmin, qmax]`, if those make one: a finite positive scale,
    /// and a zero point inside the range.
    pub fn new(scale: f32, zero_point: i64, qmin: i64, qmax: i64) -> Option<Grid> {
        let inverse = 1.0 / scale;
        let fits = scale.is_finite() && scale > 0.0 && inverse.is_finite() && qmin <= zero_point && zero_point <= qmax;
        fits.then(|| Grid { scale, inverse, low: (qmin - zero_point) as f32, high: (qmax - zero_point) as f32 })
    }

    /// The distance between two points of the grid.
    #[cfg(test)]
    pub fn step(self) -> f32 {
        self.scale
    }

    /// `x` rounded to the nearest point of the grid, within its range.
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        clamp((x * self.inverse).round(), self.low, self.high) * self.scale
    }
}

/// Rounds its input to a [`Grid`], where no op of the tool's takes the
/// rounding into its store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundToGrid(pub Grid);

impl Op for RoundToGrid {
    fn name(&self) -> StaticName {
        "RoundToGridF32".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.0)])
    }

    op_as_typed_op!();
}

impl EvalOp for RoundToGrid {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        crate::model::own_op(&self.name(), || {
            let mut tensor = args_1!(inputs).into_tensor();
            round_all(self.0, tensor.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
            Ok(tvec!(tensor.into_tvalue()))
        })
    }
}

impl TypedOp for RoundToGrid {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type(), "a grid on a {:?} tensor", inputs[0].datum_type);
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Rounds `values` in place, with the widest vector instructions this CPU has.
pub(super) fn round_all(grid: Grid, values: &mut [f32]) {
    Variant::ALL.iter().copied().find(|v| v.available()).unwrap_or(Variant::Portable).run(grid, values)
}

/// The builds of the loop, widest first.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Variant {
    const ALL: &[Variant] = &[
        #[cfg(target_arch = "x86_64")]
        Variant::Avx512,
        #[cfg(target_arch = "x86_64")]
        Variant::Avx2,
        Variant::Portable,
    ];

    fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            Variant::Portable => true,
        }
    }

    fn run(self, grid: Grid, values: &mut [f32]) {
        assert!(self.available(), "{self:?} on a CPU without it");
        match self {
            // SAFETY: the CPU has the features these are compiled for.
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => unsafe { round_avx512(grid, values) },
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => unsafe { round_avx2(grid, values) },
            Variant::Portable => round_portable(grid, values),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn round_avx512(grid: Grid, values: &mut [f32]) {
    round_portable(grid, values)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn round_avx2(grid: Grid, values: &mut [f32]) {
    round_portable(grid, values)
}

#[inline(always)]
fn round_portable(grid: Grid, values: &mut [f32]) {
    for v in values {
        *v = grid.round(*v);
    }
}

/// The grid `node` marks, if it is one of the rebuilt model's marks: a
/// `Mul` by a constant [`mark`]`(k)` marks `grids[k]`.
fn marked(model: &TypedModel, node: &TypedNode, grids: &[Grid]) -> Option<Grid> {
    let bin = node.op_as::<TypedBinOp>()?;
    if bin.0.name() != "Mul" || bin.1.is_some() || node.inputs.len() != 2 {
        return None;
    }
    let value = model.outlet_fact(node.inputs[1]).ok()?.konst.clone()?;
    if value.len() != 1 || value.datum_type() != f32::datum_type() {
        return None;
    }
    let bits = value.cast_to_scalar::<f32>().ok()?.to_bits();
    let k = (bits & !MARK_INDEX == MARK).then_some(bits & MARK_INDEX)?;
    grids.get(k as usize).copied()
}

/// The bits of a mark: a tag, and the index of its grid in the low 16
/// bits. A value, not a name, because tract merges equal constants under
/// the first one's name (NaNs equal too). A subnormal number no model
/// multiplies by, which a mark left in place by mistake would turn into
/// zeros, not into a plausible answer.
const MARK: u32 = 0x0015_0000;
const MARK_INDEX: u32 = 0xffff;

/// The value of the constant that marks `grids[k]`, for up to 65536 grids.
pub fn mark(k: usize) -> Option<f32> {
    u32::try_from(k).ok().filter(|&k| k <= MARK_INDEX).map(|k| f32::from_bits(MARK | k))
}

/// Replaces each mark of a grid in a model just loaded by a [`RoundToGrid`]
/// op. Returns how many it replaced.
pub fn wire(model: &mut TypedModel, grids: &[Grid]) -> TractResult<usize> {
    let mut wired = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(grid) = marked(model, node, grids) else { continue };
        let patch = TypedModelPatch::replace_single_op(model, node, &[node.inputs[0]], RoundToGrid(grid))?;
        patch.apply(model)?;
        wired += 1;
    }
    Ok(wired)
}

/// The [`RoundToGrid`] after `from`, its only reader: its grid, and its
/// outlet.
pub fn grid_after(model: &TypedModel, from: OutletId) -> Option<(Grid, OutletId)> {
    let next = only_reader(model, from)?;
    let grid = model.node(next).op_as::<RoundToGrid>()?.0;
    Some((grid, OutletId::new(next, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formula as the issue writes it, in integers, for one value.
    fn reference(x: f32, scale: f32, zero_point: i64, (qmin, qmax): (i64, i64)) -> f32 {
        let q = ((x as f64 / scale as f64).round() as i64 + zero_point).clamp(qmin, qmax);
        ((q - zero_point) as f64 * scale as f64) as f32
    }

    #[test]
    fn rounds_to_nearest_half_away_from_zero_within_the_range() {
        let grid = Grid::new(0.5, 3, 0, 255).unwrap();
        let cases = [(0.24, 0.0), (0.25, 0.5), (-0.25, -0.5), (0.76, 1.0), (-1.2, -1.0), (-1.25, -1.5), (-9.0, -1.5)];
        for (x, expected) in cases {
            assert_eq!(grid.round(x), expected, "{x}");
        }
        assert_eq!(grid.round(1e9), 126.0);
        assert!(grid.round(f32::NAN).is_nan());
        assert_eq!(Grid::new(0.0, 0, 0, 255), None);
        assert_eq!(Grid::new(f32::NAN, 0, 0, 255), None);
        assert_eq!(Grid::new(1.0, 300, 0, 255), None);
    }

    #[test]
    fn every_variant_rounds_as_the_formula_does() {
        let grids = [(6.0 / 255.0, 0, (0, 255)), (0.0078125, 128, (0, 255)), (0.021, -5, (-128, 127))];
        for (scale, zero_point, range) in grids {
            let grid = Grid::new(scale, zero_point, range.0, range.1).unwrap();
            let values = super::super::testing::values(1000, 7, 8.0);
            let expected: Vec<f32> = values.iter().map(|&x| reference(x, scale, zero_point, range)).collect();
            for &variant in Variant::ALL {
                if !variant.available() {
                    println!("{variant:?} skipped: this CPU lacks it");
                    continue;
                }
                let mut got = values.clone();
                variant.run(grid, &mut got);
                assert_eq!(got, expected, "{variant:?}, {grid:?}");
            }
        }
    }
}
