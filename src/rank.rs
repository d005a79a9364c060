//! The rank stage: the scores of an image as probabilities (unless the raw
//! outputs are asked for), and its best k classes.

/// One of the top classes of an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub index: usize,
    /// The class's name, when there are labels (given, or embedded in the model).
    pub label: Option<String>,
    pub score: f32,
}

/// What the printed scores are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Scores {
    /// The model's outputs when its graph ends in SOFTMAX or LOGISTIC, else
    /// their softmax: always a probability.
    #[default]
    Auto,
    /// The softmax of the model's outputs, whatever they are.
    Softmax,
    /// The model's outputs as they are (logits, for a model without SOFTMAX).
    Raw,
}

impl Scores {
    /// Whether the outputs of a model are put through a softmax, knowing
    /// whether they already are probabilities.
    pub fn softmax(self, probabilities: bool) -> bool {
        match self {
            Scores::Auto => !probabilities,
            Scores::Softmax => true,
            Scores::Raw => false,
        }
    }
}

/// Turns `scores` into probabilities, `exp(s) / sum(exp)`, in place: the
/// largest is subtracted first, so that no exponential overflows. A NaN
/// stays NaN and counts for nothing in the sum.
pub fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().filter(|s| !s.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let mut sum = 0.0f64;
    for s in scores.iter_mut() {
        // With an infinite max, only the infinite scores share the mass.
        *s = if max.is_infinite() { if *s == max { 1.0 } else { 0.0 } } else { (*s - max).exp() };
        if !s.is_nan() {
            sum += *s as f64;
        }
    }
    for s in scores.iter_mut() {
        *s = (*s as f64 / sum) as f32;
    }
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
    fn softmax_is_a_probability_and_does_not_overflow() {
        let mut scores = [1.0, 2.0, 3.0];
        softmax(&mut scores);
        let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).collect();
        let sum: f64 = e.iter().sum();
        for (got, want) in scores.iter().zip(&e) {
            assert!((*got as f64 - want / sum).abs() < 1e-6, "{scores:?}");
        }
        // Logits far beyond exp's range: shifted by their max, still exact.
        let mut large = [1000.0, 999.0, -1000.0];
        softmax(&mut large);
        assert!((large[0] - 0.7310586).abs() < 1e-6 && (large[1] - 0.2689414).abs() < 1e-6, "{large:?}");
        assert_eq!(large[2], 0.0);
        let mut equal = [5.0; 4];
        softmax(&mut equal);
        assert_eq!(equal, [0.25; 4]);
        let mut odd = [f32::NAN, 0.0, 0.0];
        softmax(&mut odd);
        assert!(odd[0].is_nan() && odd[1] == 0.5 && odd[2] == 0.5, "{odd:?}");
        let mut infinite = [f32::INFINITY, 0.0];
        softmax(&mut infinite);
        assert_eq!(infinite, [1.0, 0.0]);
        softmax(&mut []);
    }

    #[test]
    fn auto_applies_softmax_only_to_what_is_not_a_probability() {
        assert!(Scores::Auto.softmax(false) && !Scores::Auto.softmax(true));
        assert!(Scores::Softmax.softmax(true) && Scores::Softmax.softmax(false));
        assert!(!Scores::Raw.softmax(false) && !Scores::Raw.softmax(true));
    }

    #[test]
    fn agrees_with_a_full_sort() {
        let scores: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1009) as f32 / 1009.0).collect();
        let mut sorted: Vec<usize> = (0..scores.len()).collect();
        sorted.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b)));
        assert_eq!(top_k(&scores, 5), sorted[..5]);
    }
}
