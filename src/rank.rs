//! The rank stage: the best k classes of a score vector.

/// One of the top classes of an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub index: usize,
    pub label: String,
    pub score: f32,
}

/// Indices of the `k` highest scores, best first; ties go to the lower index,
/// and NaN ranks last. A partial sort: O(n + k log k).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(scores.len());
    if k == 0 {
        return vec![];
    }
    let better = |a: &usize, b: &usize| {
        let key = |i: &usize| if scores[*i].is_nan() { f32::NEG_INFINITY } else { scores[*i] };
        key(b).total_cmp(&key(a)).then(a.cmp(b))
    };
    let mut indices: Vec<usize> = (0..scores.len()).collect();
    if k < indices.len() {
        indices.select_nth_unstable_by(k - 1, better);
        indices.truncate(k);
    }
    indices.sort_unstable_by(better);
    indices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_first_with_stable_ties() {
        let scores = [0.1, 0.5, 0.2, 0.5, 0.0, f32::NAN];
        assert_eq!(top_k(&scores, 3), vec![1, 3, 2]);
        assert_eq!(top_k(&scores, 1), vec![1]);
        assert_eq!(top_k(&scores, 10), vec![1, 3, 2, 0, 4, 5]);
        assert!(top_k(&scores, 0).is_empty());
        assert!(top_k(&[], 3).is_empty());
    }

    #[test]
    fn agrees_with_a_full_sort() {
        let scores: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1009) as f32 / 1009.0).collect();
        let mut sorted: Vec<usize> = (0..scores.len()).collect();
        sorted.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b)));
        assert_eq!(top_k(&scores, 5), sorted[..5]);
    }
}
