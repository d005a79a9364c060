//! What the tool's own ops share: the pieces of their vector loops, and
//! finding the nodes after a convolution that they can take in.

use std::sync::Arc;

use tract_tflite::internal::tract_core::ops::binary::TypedBinOp;
use tract_tflite::internal::*;

use super::grid::Grid;

/// Channels in one vector of sums: one AVX-512 register, two AVX ones.
pub const LANES: usize = 16;

/// `a` clamped to `[low, high]`, written as comparisons, which become single
/// min and max instructions.
#[inline(always)]
pub fn clamp(a: f32, low: f32, high: f32) -> f32 {
    // A NaN passes through, as in TFLite's own clamps, and is not turned
    // into a bound when none was fused. Two plain selects: nested ones stop
    // the compiler from vectorising the stores (19 against 12 ms a model).
    let a = if a < low { low } else { a };
    if a > high { high } else { a }
}

/// Stores `sums` into `out`, clamped to `[low, high]`, then rounded to
/// `grid` when a quantized activation's rounding was fused.
#[inline(always)]
pub fn store_lanes(out: &mut [f32], sums: &[f32], low: f32, high: f32, grid: Option<Grid>) {
    // Two loops, not a test per value: each vectorises on its own.
    match grid {
        None => {
            for (o, &a) in out.iter_mut().zip(sums) {
                *o = clamp(a, low, high);
            }
        }
        Some(grid) => {
            for (o, &a) in out.iter_mut().zip(sums) {
                *o = grid.round(clamp(a, low, high));
            }
        }
    }
}

/// `x` rounded to `grid`, if there is one.
#[inline(always)]
pub fn round_to(grid: Option<Grid>, x: f32) -> f32 {
    match grid {
        Some(grid) => grid.round(x),
        None => x,
    }
}

/// `LANES` values of `data` from `at`, read without a bounds check: these
/// reads are most of the ops' instructions otherwise.
///
/// # Safety
/// `at + LANES <= data.len()`. The callers read at offsets their `eval`
/// checked against the slices' sizes, at pixels that `taps` keeps inside
/// the input.
#[inline(always)]
pub unsafe fn lanes(data: &[f32], at: usize) -> [f32; LANES] {
    debug_assert!(at + LANES <= data.len());
    // SAFETY: in bounds, as the caller promises; any alignment will do.
    unsafe { data.as_ptr().add(at).cast::<[f32; LANES]>().read_unaligned() }
}

#[inline(always)]
pub fn multiply_add<const FUSED: bool>(x: f32, w: f32, acc: f32) -> f32 {
    if FUSED { x.mul_add(w, acc) } else { acc + x * w }
}

/// The kernel taps `[first, end)` along one axis that fall inside the input
/// for output position `o`.
#[inline]
pub fn taps(o: usize, stride: usize, pad: usize, kernel: usize, input: usize) -> (usize, usize) {
    let start = o * stride;
    // Tap k reads input row start + k - pad, which must be in [0, input).
    let first = pad.saturating_sub(start);
    let end = kernel.min((input + pad).saturating_sub(start));
    (first, end.max(first))
}

/// The clamp after `from`: a `max` with a constant, then a `min` with one,
/// each the only reader of what came before. Returns its bounds (infinite
/// where there is none) and the last outlet it covers.
pub fn fused_clamp(model: &TypedModel, from: OutletId) -> TractResult<(f32, f32, OutletId)> {
    let (mut low, mut high) = (f32::NEG_INFINITY, f32::INFINITY);
    let mut last = from;
    for (name, bound) in [("Max", &mut low), ("Min", &mut high)] {
        let Some(next) = only_reader(model, last) else { break };
        let Some(bin) = model.node(next).op_as::<TypedBinOp>() else { break };
        // An op that casts its output is left to tract.
        if bin.0.name() != name || bin.1.is_some() {
            break;
        }
        let other = model.node(next).inputs.iter().find(|&&o| o != last).copied();
        let Some(value) = other.map(|o| constant(model, o)).transpose()?.flatten() else { break };
        let value = match value.cast_to_scalar::<f32>() {
            Ok(v) if value.len() == 1 && !v.is_nan() => v,
            _ => break,
        };
        *bound = value;
        last = OutletId::new(next, 0);
    }
    Ok((low, high, last))
}

/// The value of `outlet` if a constant node gives it.
pub fn constant(model: &TypedModel, outlet: OutletId) -> TractResult<Option<Arc<Tensor>>> {
    Ok(model.outlet_fact(outlet)?.konst.clone())
}

/// The one node reading `outlet`, if it has exactly one reader and is not an
/// output of the model.
pub fn only_reader(model: &TypedModel, outlet: OutletId) -> Option<usize> {
    let successors = &model.node(outlet.node).outputs[outlet.slot].successors;
    (successors.len() == 1 && !model.outputs.contains(&outlet)).then(|| successors[0].node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_are_exactly_those_inside_the_input() {
        for (stride, pad, kernel, input) in (1..=3)
            .flat_map(|s| (0..=3).flat_map(move |p| (1..=5).flat_map(move |k| (1..=9).map(move |i| (s, p, k, i)))))
        {
            // Past the last output any padding after the input gives, and
            // further: those must have no taps at all.
            let outputs = (input + 2 * pad + kernel) / stride + 2;
            for o in 0..outputs {
                let inside = |k: usize| (0..input as isize).contains(&((o * stride + k) as isize - pad as isize));
                let expected: Vec<usize> = (0..kernel).filter(|&k| inside(k)).collect();
                let (first, end) = taps(o, stride, pad, kernel, input);
                let what = format!("o {o}, stride {stride}, pad {pad}, kernel {kernel}, input {input}");
                assert!(first <= end, "{what}: {first}..{end}");
                assert_eq!((first..end).collect::<Vec<_>>(), expected, "{what}");
                // The kernels compute where the first tap reads even when
                // there is none: that must not wrap around.
                assert!(o * stride + first >= pad || first == end, "{what}");
            }
        }
    }
}
