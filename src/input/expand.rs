//! Sources that stand for many: a folder is the image files under it, a
//! pattern the files it matches. Expanded lazily, into paths (strings, not
//! images), each with its own record: a folder of a million files is walked
//! as its images are classified, and the first records print before the
//! walk is over.
//!
//! - A folder is walked recursively (`walkdir`) in sorted path order,
//!   skipping hidden files and folders (a name starting with `.`) and every
//!   file whose extension is not an image's; `max_depth` 1 is the files
//!   directly in the folder.
//! - A local path that does not exist and holds `*`, `?` or `[` is a
//!   pattern (`glob`: `**` crosses folders), expanded in sorted order to the
//!   files it matches, whatever their extension; `*` and `?` do not match a
//!   leading `.`. Its matches are listed (as paths) before the first is
//!   handed on, since `**` does not walk in sorted order.
//! - Anything else (a URL, a file, a path that is neither) stays as given.

use std::path::Path;

use super::Source;

/// The extensions of the image files a folder expands to, lower-case.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"];

/// How folders are walked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpandOptions {
    /// How deep a folder is walked: 1 is the files directly in it, 2 those
    /// in its subfolders too, and so on. `None`: all the way down.
    pub max_depth: Option<usize>,
}

/// One entry of the expanded list: a source to classify, or a record that
/// is an error from the start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expanded {
    /// A source as the user gave it.
    Given(String),
    /// A file found in a folder or by a pattern.
    Found(String),
    Failed {
        source: String,
        reason: String,
    },
}

impl Expanded {
    /// The record's `source`.
    pub fn source(&self) -> &str {
        match self {
            Expanded::Given(source) | Expanded::Found(source) | Expanded::Failed { source, .. } => source,
        }
    }
}

/// Expands every folder and pattern among `inputs`, in their order, as the
/// entries are asked for.
pub fn expand(inputs: Vec<String>, options: ExpandOptions) -> Expansion {
    Expansion { inputs: inputs.into_iter(), options, current: Current::Idle }
}

/// The entries `inputs` expand to, in order; see [`expand`].
pub struct Expansion {
    inputs: std::vec::IntoIter<String>,
    options: ExpandOptions,
    current: Current,
}

/// What the input being expanded has left to give.
enum Current {
    Idle,
    Walk(Walk),
    Listed(std::vec::IntoIter<Expanded>),
}

impl Iterator for Expansion {
    type Item = Expanded;

    fn next(&mut self) -> Option<Expanded> {
        loop {
            let next = match &mut self.current {
                Current::Idle => None,
                Current::Walk(walk) => walk.next(),
                Current::Listed(list) => list.next(),
            };
            if next.is_some() {
                return next;
            }
            let input = self.inputs.next()?;
            self.current = match Source::parse(&input) {
                Ok(Source::Path(path)) if path.is_dir() => Current::Walk(Walk::new(input, &path, self.options)),
                Ok(Source::Path(path)) if !path.exists() && input.contains(['*', '?', '[']) => {
                    Current::Listed(matches(&input).into_iter())
                }
                _ => {
                    self.current = Current::Idle;
                    return Some(Expanded::Given(input));
                }
            };
        }
    }
}

/// A folder being walked.
struct Walk {
    input: String,
    entries: walkdir::FilterEntry<walkdir::IntoIter, fn(&walkdir::DirEntry) -> bool>,
    /// Whether the walk has given an entry yet.
    gave: bool,
}

impl Walk {
    fn new(input: String, root: &Path, options: ExpandOptions) -> Walk {
        let mut walker = walkdir::WalkDir::new(root).follow_links(true).sort_by_file_name();
        if let Some(depth) = options.max_depth {
            walker = walker.max_depth(depth);
        }
        // The folder itself may be hidden: the user named it.
        let shown: fn(&walkdir::DirEntry) -> bool = |e| e.depth() == 0 || !is_hidden(e.file_name());
        Walk { input, entries: walker.into_iter().filter_entry(shown), gave: false }
    }
}

impl Iterator for Walk {
    type Item = Expanded;

    fn next(&mut self) -> Option<Expanded> {
        for entry in &mut self.entries {
            let found = match entry {
                Ok(entry) if entry.file_type().is_file() && is_image(entry.path()) => {
                    Expanded::Found(name(entry.path()))
                }
                Ok(_) => continue,
                Err(e) => {
                    let source = e.path().map_or_else(|| self.input.clone(), name);
                    let reason = match e.io_error() {
                        Some(io) => format!("cannot read folder: {io}"),
                        None => format!("cannot read folder: {e}"),
                    };
                    Expanded::Failed { source, reason }
                }
            };
            self.gave = true;
            return Some(found);
        }
        if self.gave {
            return None;
        }
        self.gave = true;
        Some(Expanded::Failed { source: self.input.clone(), reason: "no images in this folder".into() })
    }
}

fn matches(pattern: &str) -> Vec<Expanded> {
    let options =
        glob::MatchOptions { case_sensitive: true, require_literal_separator: true, require_literal_leading_dot: true };
    let paths = match glob::glob_with(pattern, options) {
        Ok(paths) => paths,
        Err(e) => {
            return vec![Expanded::Failed { source: pattern.to_string(), reason: format!("invalid pattern: {e}") }];
        }
    };
    let mut found = vec![];
    for path in paths {
        match path {
            Ok(path) if path.is_file() => found.push(Expanded::Found(name(&path))),
            Ok(_) => {}
            Err(e) => found.push(Expanded::Failed {
                source: name(e.path()),
                reason: format!("cannot read folder: {}", e.error()),
            }),
        }
    }
    if found.is_empty() {
        return vec![Expanded::Failed { source: pattern.to_string(), reason: "no file matches the pattern".into() }];
    }
    // glob yields each folder's entries in order; sorting the whole list
    // puts the records in path order whatever `**` crossed.
    found.sort_by(|a, b| Path::new(a.source()).cmp(Path::new(b.source())));
    found
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b".")
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|image| e.eq_ignore_ascii_case(image)))
}

/// A path as a record's `source` (a name that is not UTF-8 is shown lossily).
fn name(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree with nested folders, hidden files and folders, other files and
    /// upper-case extensions; files hold nothing (expansion never reads them).
    fn tree() -> (tempdir::Dir, String) {
        let dir = tempdir::Dir::new("tree");
        for file in [
            "b.jpg",
            "a.PNG",
            "notes.txt",
            "c.jpeg.bak",
            ".hidden.jpg",
            "noext",
            "sub/z.webp",
            "sub/Y.TIFF",
            "sub/x.gif",
            "sub/readme.md",
            "sub/deeper/img_001.jpg",
            "sub/deeper/img_002.bmp",
            "sub/deeper/img_0003.jpg",
            "sub/deeper/w.tif",
            "sub/.cache/secret.jpg",
            ".git/objects.png",
            "empty/only.txt",
            "b/inside.jpeg",
            "only_deep/inner/p.jpg",
        ] {
            dir.write(file);
        }
        let root = dir.path().to_str().unwrap().to_string();
        (dir, root)
    }

    fn expand(inputs: Vec<String>, options: ExpandOptions) -> Vec<Expanded> {
        super::expand(inputs, options).collect()
    }

    fn sources(expanded: &[Expanded], root: &str) -> Vec<String> {
        expanded
            .iter()
            .map(|e| match e {
                Expanded::Found(s) => s.strip_prefix(root).unwrap().to_string(),
                Expanded::Given(s) => format!("given {s}"),
                Expanded::Failed { source, reason } => format!("{source}: {reason}"),
            })
            .collect()
    }

    #[test]
    fn a_folder_is_its_images_in_path_order() {
        let (_dir, root) = tree();
        let all = expand(vec![root.clone()], ExpandOptions::default());
        assert_eq!(
            sources(&all, &root),
            [
                "/a.PNG",
                "/b/inside.jpeg",
                "/b.jpg",
                "/only_deep/inner/p.jpg",
                "/sub/Y.TIFF",
                "/sub/deeper/img_0003.jpg",
                "/sub/deeper/img_001.jpg",
                "/sub/deeper/img_002.bmp",
                "/sub/deeper/w.tif",
                "/sub/x.gif",
                "/sub/z.webp",
            ]
        );
        // A trailing slash gives the same paths.
        assert_eq!(expand(vec![format!("{root}/")], ExpandOptions::default()), all);
    }

    #[test]
    fn a_folder_is_walked_as_its_entries_are_asked_for() {
        let dir = tempdir::Dir::new("lazy");
        dir.write("a/1.jpg");
        std::fs::create_dir_all(dir.path().join("z")).unwrap();
        let root = dir.path().to_str().unwrap().to_string();
        let mut expansion = super::expand(vec![root.clone()], ExpandOptions::default());
        assert_eq!(expansion.next(), Some(Expanded::Found(format!("{root}/a/1.jpg"))));
        // Not read yet: a file written now is found.
        dir.write("z/2.jpg");
        assert_eq!(expansion.next(), Some(Expanded::Found(format!("{root}/z/2.jpg"))));
        assert_eq!(expansion.next(), None);
    }

    #[test]
    fn max_depth_limits_the_walk() {
        let (_dir, root) = tree();
        let depth = |n| sources(&expand(vec![root.clone()], ExpandOptions { max_depth: Some(n) }), &root);
        assert_eq!(depth(1), ["/a.PNG", "/b.jpg"]);
        assert_eq!(depth(2), ["/a.PNG", "/b/inside.jpeg", "/b.jpg", "/sub/Y.TIFF", "/sub/x.gif", "/sub/z.webp"]);
        assert_eq!(depth(3).len(), 11);
    }

    #[test]
    fn a_folder_without_images_is_one_error_record() {
        let (_dir, root) = tree();
        let empty = format!("{root}/empty");
        assert_eq!(
            expand(vec![empty.clone()], ExpandOptions::default()),
            [Expanded::Failed { source: empty, reason: "no images in this folder".into() }]
        );
        // Images only below the depth limit: none in the folder as walked.
        let deep = format!("{root}/only_deep");
        assert_eq!(
            expand(vec![deep.clone()], ExpandOptions { max_depth: Some(1) }),
            [Expanded::Failed { source: deep.clone(), reason: "no images in this folder".into() }]
        );
        assert_eq!(
            sources(&expand(vec![deep], ExpandOptions { max_depth: Some(2) }), &root),
            ["/only_deep/inner/p.jpg"]
        );
    }

    #[test]
    fn patterns_expand_in_sorted_order() {
        let (_dir, root) = tree();
        let expand1 =
            |pattern: &str| sources(&expand(vec![format!("{root}{pattern}")], ExpandOptions::default()), &root);
        assert_eq!(
            expand1("/**/*.jpg"),
            ["/b.jpg", "/only_deep/inner/p.jpg", "/sub/deeper/img_0003.jpg", "/sub/deeper/img_001.jpg"]
        );
        assert_eq!(expand1("/*/*/img_???.*"), ["/sub/deeper/img_001.jpg", "/sub/deeper/img_002.bmp"]);
        // Whatever the extension: the user chose the files.
        assert_eq!(expand1("/sub/[rx]*"), ["/sub/readme.md", "/sub/x.gif"]);
        // Folders that match are not files.
        assert_eq!(expand1("/su?"), [format!("{root}/su?: no file matches the pattern")]);
        assert_eq!(expand1("/**/*.png"), [format!("{root}/**/*.png: no file matches the pattern")]);
    }

    #[test]
    fn other_sources_stay_as_given_in_order() {
        let (dir, root) = tree();
        // A file whose name looks like a pattern is a file.
        dir.write("odd[1].jpg");
        let inputs = vec![
            "https://example.org/*.jpg".to_string(),
            format!("{root}/odd[1].jpg"),
            format!("{root}/sub/deeper/w.tif"),
            "missing.jpg".to_string(),
            "ftp://example.org/a?.jpg".to_string(),
            format!("{root}/sub/deeper/*.bmp"),
        ];
        let expanded = expand(inputs.clone(), ExpandOptions::default());
        let mut expected: Vec<Expanded> = inputs[..5].iter().cloned().map(Expanded::Given).collect();
        expected.push(Expanded::Found(format!("{root}/sub/deeper/img_002.bmp")));
        assert_eq!(expanded, expected);
    }

    /// A temporary folder, removed when dropped.
    mod tempdir {
        use std::path::{Path, PathBuf};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new(name: &str) -> Dir {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let path = std::env::temp_dir().join(format!("classifier-{name}-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }

            pub fn path(&self) -> &Path {
                &self.0
            }

            pub fn write(&self, file: &str) {
                let path = self.0.join(file);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, b"").unwrap();
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
