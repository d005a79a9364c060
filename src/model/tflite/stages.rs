//! Cutting the rebuilt model into stages, so that tract can prepare them on
//! several threads at once: it prepares a graph on one thread, in a time
//! that grows faster than the graph. Each cut sits where exactly one tensor
//! flows from the operators before it to those after it, so the stages run
//! as a chain.

use std::collections::HashMap;

use super::write::{NewOp, NewTensor, Rebuilt};

impl<'a> Rebuilt<'a> {
    /// TFLite requires operators in an order where every tensor is written
    /// before it is read (a file that breaks the rule fails in tract, stage
    /// or no stage). A cut before operator `b` is possible when one tensor
    /// alone is alive there, the output of operator `b - 1`. Returns, for
    /// each such `b`, that tensor.
    fn cuts(&self) -> Vec<(usize, i32)> {
        let n = self.ops.len();
        let mut written = vec![None; self.tensors.len()];
        let mut last_read = vec![None; self.tensors.len()];
        for (i, op) in self.ops.iter().enumerate() {
            for &t in &op.outputs {
                written[t as usize] = Some(i);
            }
            for &t in op.inputs.iter().filter(|&&t| t >= 0) {
                last_read[t as usize] = Some(i);
            }
        }
        // alive[b]: the tensors computed before `b` and still needed at `b`.
        // Constants are not counted: a stage carries its own copy.
        let mut delta = vec![0i64; n + 2];
        for (t, tensor) in self.tensors.iter().enumerate() {
            if tensor.data.is_some() {
                continue;
            }
            let first = if self.inputs.contains(&(t as i32)) {
                0
            } else if let Some(w) = written[t] {
                w + 1
            } else {
                continue;
            };
            let last = if self.outputs.contains(&(t as i32)) {
                n
            } else if let Some(r) = last_read[t] {
                r
            } else {
                continue;
            };
            if first <= last {
                delta[first] += 1;
                delta[last + 1] -= 1;
            }
        }
        let mut alive = 0;
        let mut cuts = vec![];
        for (b, change) in delta.iter().take(n).enumerate() {
            alive += change;
            if b == 0 || alive != 1 {
                continue;
            }
            if let [t] = self.ops[b - 1].outputs[..]
                && last_read[t as usize].is_some_and(|r| r >= b)
            {
                cuts.push((b, t));
            }
        }
        cuts
    }

    /// Cuts the model into at most `stages` stages of about equal cost.
    pub(super) fn into_stages(self, stages: usize) -> Vec<Rebuilt<'a>> {
        let cuts = self.cuts();
        let stages = stages.min(cuts.len() + 1);
        if stages < 2 {
            return vec![self];
        }
        // What preparing an operator costs: copying its weights (several
        // times over, each first touch of a page a fault), and graph surgery
        // worth about 256 KiB of weights per operator in cold runs.
        let cost = |op: &NewOp| -> u64 {
            let weights: usize = op
                .inputs
                .iter()
                .filter(|&&t| t >= 0)
                .filter_map(|&t| self.tensors[t as usize].data.as_ref())
                .map(|d| d.len())
                .sum();
            weights as u64 + (256 << 10)
        };
        let mut before = vec![0u64];
        for op in &self.ops {
            before.push(before.last().unwrap() + cost(op));
        }
        let total = *before.last().unwrap();
        let mut chosen: Vec<(usize, i32)> = vec![];
        for k in 1..stages as u64 {
            let target = total * k / stages as u64;
            let after_last = chosen.last().map_or(0, |c| c.0);
            let best = cuts.iter().filter(|c| c.0 > after_last).min_by_key(|c| before[c.0].abs_diff(target));
            if let Some(&cut) = best {
                chosen.push(cut);
            }
        }
        chosen.dedup();
        let mut bounds = vec![(0, self.inputs.clone())];
        bounds.extend(chosen.iter().map(|&(b, t)| (b, vec![t])));
        let ends: Vec<(usize, Vec<i32>)> =
            chosen.iter().map(|&(b, t)| (b, vec![t])).chain([(self.ops.len(), self.outputs.clone())]).collect();
        // Each tensor goes to the stages that use it; the last of them takes
        // it, the others copy it.
        let mut last_stage = vec![0usize; self.tensors.len()];
        for (s, ((start, inputs), (end, outputs))) in bounds.iter().zip(&ends).enumerate() {
            let used = self.ops[*start..*end].iter().flat_map(|op| op.inputs.iter().chain(&op.outputs));
            for &t in used.chain(inputs).chain(outputs).filter(|&&t| t >= 0) {
                last_stage[t as usize] = s;
            }
        }
        let Rebuilt { tensors, ops, .. } = self;
        let mut tensors: Vec<Option<NewTensor<'a>>> = tensors.into_iter().map(Some).collect();
        let mut ops = ops.into_iter();
        let mut result = vec![];
        for (s, ((start, inputs), (end, outputs))) in bounds.into_iter().zip(ends).enumerate() {
            let mut stage = Rebuilt::default();
            let mut map: HashMap<i32, i32> = HashMap::new();
            let mut local = |t: i32, stage: &mut Rebuilt<'a>| -> i32 {
                if t < 0 {
                    return t;
                }
                *map.entry(t).or_insert_with(|| {
                    let slot = &mut tensors[t as usize];
                    let tensor = if last_stage[t as usize] == s { slot.take() } else { slot.clone() };
                    stage.push(tensor.expect("a tensor is taken by the last stage that uses it"))
                })
            };
            stage.inputs = inputs.iter().map(|&t| local(t, &mut stage)).collect();
            for op in ops.by_ref().take(end - start) {
                let inputs = op.inputs.iter().map(|&t| local(t, &mut stage)).collect();
                let outputs = op.outputs.iter().map(|&t| local(t, &mut stage)).collect();
                stage.ops.push(NewOp { inputs, outputs, ..op });
            }
            stage.outputs = outputs.iter().map(|&t| local(t, &mut stage)).collect();
            result.push(stage);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use tract_tflite::tflite::{self, BuiltinOperator};

    use super::super::mock_model;
    use super::super::read::Graph;
    use super::*;

    fn whole(bytes: &[u8]) -> Rebuilt<'_> {
        Graph::from_bytes(bytes).unwrap().rebuild(false).unwrap().0
    }

    #[test]
    fn cuts_fall_where_one_tensor_flows() {
        let bytes = mock_model();
        let whole = whole(&bytes);
        let codes: Vec<_> = whole.ops.iter().map(|op| op.code).collect();
        use BuiltinOperator as B;
        assert_eq!(
            codes,
            [B::CONV_2D, B::CONV_2D, B::ADD, B::AVERAGE_POOL_2D, B::RESHAPE, B::FULLY_CONNECTED, B::SOFTMAX]
        );
        // Both convolutions read the input and the ADD reads both: no cut
        // before the ADD has run.
        let before: Vec<usize> = whole.cuts().iter().map(|&(before, _)| before).collect();
        assert_eq!(before, [3, 4, 5, 6]);
    }

    #[test]
    fn stages_chain_into_the_whole_model() {
        let bytes = mock_model();
        let name = |stage: &Rebuilt, t: &[i32]| -> Vec<String> {
            t.iter().map(|&t| stage.tensors[t as usize].name.clone()).collect()
        };
        let whole = whole(&bytes);
        let codes: Vec<_> = whole.ops.iter().map(|op| op.code).collect();
        for wanted in 1..7 {
            let stages = self::whole(&bytes).into_stages(wanted);
            assert_eq!(stages.len(), wanted.min(5), "{wanted} stages wanted");
            let staged: Vec<_> = stages.iter().flat_map(|s| s.ops.iter().map(|op| op.code)).collect();
            assert_eq!(staged, codes);
            assert_eq!(name(&stages[0], &stages[0].inputs), name(&whole, &whole.inputs));
            let last = stages.last().unwrap();
            assert_eq!(name(last, &last.outputs), name(&whole, &whole.outputs));
            for pair in stages.windows(2) {
                assert_eq!(name(&pair[0], &pair[0].outputs), name(&pair[1], &pair[1].inputs));
                assert_eq!(pair[0].outputs.len(), 1);
            }
            for stage in &stages {
                let (buffer, head) = stage.serialize();
                let model = tflite::root_as_model(&buffer[head..]).unwrap();
                assert_eq!(model.subgraphs().unwrap().get(0).operators().unwrap().len(), stage.ops.len());
            }
        }
    }
}
