//! The label map: class index → name.
//!
//! Two formats, told apart by content: a CSV with an `id,name` header (rows
//! in any order, as the AIY label maps are), or plain text with one label a
//! line, line N naming class N (as TensorFlow's ImageNet `labels.txt` is).

/// Names of the model's classes, indexed by class.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels(Vec<String>);

#[derive(Debug, thiserror::Error)]
pub enum LabelsError {
    #[error("the label map is empty")]
    Empty,
    #[error("the label map is not UTF-8 text")]
    NotText,
    #[error("CSV line {line}: {reason}")]
    Csv { line: u64, reason: String },
    #[error("class {0} is named twice")]
    Duplicate(usize),
    #[error("class {0} has no name (ids must run from 0 without gaps)")]
    Gap(usize),
    #[error("the label map names {labels} classes but the model scores {classes}")]
    CountMismatch { labels: usize, classes: usize },
}

impl Labels {
    pub fn parse(bytes: &[u8]) -> Result<Labels, LabelsError> {
        let text = std::str::from_utf8(bytes).map_err(|_| LabelsError::NotText)?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let first = text.lines().next().unwrap_or("").trim();
        if first.is_empty() && text.trim().is_empty() {
            return Err(LabelsError::Empty);
        }
        if is_csv_header(first) { parse_csv(text) } else { Ok(parse_lines(text)) }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, class: usize) -> Option<&str> {
        self.0.get(class).map(String::as_str)
    }

    /// Checks that there is one label per class of the model.
    pub fn check_count(&self, classes: usize) -> Result<(), LabelsError> {
        if self.len() == classes { Ok(()) } else { Err(LabelsError::CountMismatch { labels: self.len(), classes }) }
    }
}

fn is_csv_header(line: &str) -> bool {
    let mut fields = line.split(',').map(|f| f.trim().trim_matches('"').to_ascii_lowercase());
    matches!((fields.next().as_deref(), fields.next().as_deref()), (Some("id" | "index"), Some(_)))
}

fn parse_csv(text: &str) -> Result<Labels, LabelsError> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).trim(csv::Trim::All).from_reader(text.as_bytes());
    let mut names: Vec<Option<String>> = vec![];
    for record in reader.records() {
        let record = record.map_err(|e| LabelsError::Csv {
            line: e.position().map(|p| p.line()).unwrap_or(0),
            reason: e.to_string(),
        })?;
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        let csv_error = |reason: String| LabelsError::Csv { line, reason };
        let (Some(id), Some(name)) = (record.get(0), record.get(1)) else {
            return Err(csv_error("expected two fields, id and name".into()));
        };
        let id: usize = id.parse().map_err(|_| csv_error(format!("id {id:?} is not a class index")))?;
        // A label map is small; an absurd id is an error, not an allocation.
        if id > 1_000_000 {
            return Err(csv_error(format!("id {id} is out of range")));
        }
        if id >= names.len() {
            names.resize(id + 1, None);
        }
        if names[id].replace(name.to_string()).is_some() {
            return Err(LabelsError::Duplicate(id));
        }
    }
    if names.is_empty() {
        return Err(LabelsError::Empty);
    }
    names
        .into_iter()
        .enumerate()
        .map(|(id, name)| name.ok_or(LabelsError::Gap(id)))
        .collect::<Result<_, _>>()
        .map(Labels)
}

fn parse_lines(text: &str) -> Labels {
    let mut lines: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    Labels(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_in_any_order() {
        let labels = Labels::parse(b"id,name\n2,background\n0,Turdus migratorius\n1,\"Pica pica, magpie\"\n").unwrap();
        assert_eq!(labels.len(), 3);
        assert_eq!(labels.get(0), Some("Turdus migratorius"));
        assert_eq!(labels.get(1), Some("Pica pica, magpie"));
        assert_eq!(labels.get(2), Some("background"));
    }

    #[test]
    fn text_one_label_a_line() {
        let labels = Labels::parse(b"background\ntench, Tinca tinca\ngoldfish\n\n").unwrap();
        assert_eq!(labels.len(), 3);
        assert_eq!(labels.get(1), Some("tench, Tinca tinca"));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(matches!(Labels::parse(b""), Err(LabelsError::Empty)));
        assert!(matches!(Labels::parse(b"id,name\n0,a\n2,c\n"), Err(LabelsError::Gap(1))));
        assert!(matches!(Labels::parse(b"id,name\n0,a\n0,b\n"), Err(LabelsError::Duplicate(0))));
        let err = Labels::parse(b"id,name\n0,a\nx,b\n").unwrap_err();
        assert_eq!(err.to_string(), "CSV line 3: id \"x\" is not a class index");
        assert!(matches!(Labels::parse(&[0xff, 0xfe, 0x00]), Err(LabelsError::NotText)));
        let labels = Labels::parse(b"a\nb\n").unwrap();
        assert_eq!(
            labels.check_count(965).unwrap_err().to_string(),
            "the label map names 2 classes but the model scores 965"
        );
    }
}
