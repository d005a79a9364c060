//! The render stage: one record per source, as text or JSON Lines.

use std::fmt::Write as _;

use serde::Serialize;

use crate::engine::SourceError;
use crate::rank::Prediction;

/// How results are printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A block per source: its name, then one `score  label (class)` line per prediction.
    Text,
    /// JSON Lines: one object per source, in the order given.
    Json,
}

/// What became of one source.
pub type Outcome = Result<Vec<Prediction>, SourceError>;

/// One prediction of a [`Record`].
#[derive(Debug, Serialize)]
pub struct JsonPrediction<'a> {
    /// `null` when there are no labels.
    label: Option<&'a str>,
    index: usize,
    score: f64,
}

/// The JSON object of one source: a JSON Lines record of the command line,
/// and each of the results a server answers, alike.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Record<'a> {
    Predictions {
        source: &'a str,
        predictions: Vec<JsonPrediction<'a>>,
        /// A server's answer from its result cache; never on the command line.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        cached: bool,
    },
    Error {
        source: &'a str,
        error: String,
    },
}

impl<'a> Record<'a> {
    pub fn new(source: &'a str, outcome: &'a Outcome) -> Record<'a> {
        Record::of(source, outcome.as_deref(), false)
    }

    /// The record of predictions or an error held elsewhere (shared by a
    /// server's result cache, say).
    pub fn of(source: &'a str, outcome: Result<&'a [Prediction], &SourceError>, cached: bool) -> Record<'a> {
        match outcome {
            Ok(predictions) => Record::Predictions {
                source,
                predictions: predictions
                    .iter()
                    .map(|p| JsonPrediction { label: p.label.as_deref(), index: p.index, score: round(p.score) })
                    .collect(),
                cached,
            },
            Err(error) => Record::Error { source, error: error.to_string() },
        }
    }
}

/// Scores are computed in f32; six decimals say all they hold, and keep
/// `0.81` from printing as `0.8100000023841858`.
fn round(score: f32) -> f64 {
    (score as f64 * 1e6).round() / 1e6
}

/// The record for `source`, ending with a newline.
pub fn render(format: Format, source: &str, outcome: &Outcome) -> String {
    match format {
        Format::Json => {
            let mut line = serde_json::to_string(&Record::new(source, outcome)).expect("records serialize");
            line.push('\n');
            line
        }
        Format::Text => {
            let mut out = format!("{source}\n");
            match outcome {
                Ok(predictions) => {
                    for p in predictions {
                        let _ = match &p.label {
                            Some(label) => writeln!(out, "  {:.4}  {label} ({})", p.score, p.index),
                            None => writeln!(out, "  {:.4}  class {}", p.score, p.index),
                        };
                    }
                }
                Err(error) => {
                    let _ = writeln!(out, "  error: {error}");
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn robin() -> Outcome {
        Ok(vec![
            Prediction { index: 484, label: Some("Turdus migratorius".into()), score: 0.953125 },
            Prediction { index: 12, label: Some("Sialia \"eastern\" bluebird".into()), score: 0.81 },
        ])
    }

    #[test]
    fn json_lines_schema() {
        let line = render(Format::Json, "https://h/robin.jpg", &robin());
        assert_eq!(
            line,
            "{\"source\":\"https://h/robin.jpg\",\"predictions\":[{\"label\":\"Turdus migratorius\",\"index\":484,\"score\":0.953125},\
             {\"label\":\"Sialia \\\"eastern\\\" bluebird\",\"index\":12,\"score\":0.81}]}\n"
        );
        let line = render(
            Format::Json,
            "a.jpg",
            &Err(SourceError::from(crate::input::FetchError::Status(reqwest::StatusCode::NOT_FOUND))),
        );
        assert_eq!(line, "{\"source\":\"a.jpg\",\"error\":\"HTTP 404 Not Found\"}\n");
    }

    #[test]
    fn without_labels_a_class_is_its_index() {
        let unnamed = Ok(vec![Prediction { index: 7, label: None, score: 0.5 }]);
        assert_eq!(
            render(Format::Json, "a.jpg", &unnamed),
            "{\"source\":\"a.jpg\",\"predictions\":[{\"label\":null,\"index\":7,\"score\":0.5}]}\n"
        );
        assert_eq!(render(Format::Text, "a.jpg", &unnamed), "a.jpg\n  0.5000  class 7\n");
    }

    #[test]
    fn text_is_a_block_per_source() {
        assert_eq!(
            render(Format::Text, "robin.jpg", &robin()),
            "robin.jpg\n  0.9531  Turdus migratorius (484)\n  0.8100  Sialia \"eastern\" bluebird (12)\n"
        );
        assert_eq!(
            render(Format::Text, "x.jpg", &Err(crate::image::DecodeError::Empty.into())),
            "x.jpg\n  error: empty body\n"
        );
    }
}
