//! Sentences as model input (`--texts FILE --tokenizer tokenizer.json
//! --max-length N`): one sentence per line, tokenized by a Hugging Face
//! `tokenizer.json` (the `tokenizers` crate), truncated and padded to N
//! tokens, and fed by input name: the token ids, the attention mask (1 for
//! a token, 0 for padding) and the token types (the tokenizer's, 0 for a
//! single sentence). Only each line's place in the file is held; the lines
//! are read and tokenized batch by batch, so memory does not grow with the
//! file.

use super::npy::DataError;
use crate::tensor::{DType, Tensor};
use ndarray::{ArrayD, IxDyn};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::{PaddingParams, PaddingStrategy, PostProcessor, Tokenizer, TruncationParams};

/// Where sentences come from and how they become tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct TextSource {
    /// The text file: one sentence per line (UTF-8).
    pub file: PathBuf,
    /// The Hugging Face `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// Tokens per sentence, after truncation and padding (`None`: the
    /// model input's sequence length when it is fixed, else
    /// [`DEFAULT_MAX_LENGTH`]).
    pub max_length: Option<usize>,
}

/// Tokens per sentence when neither the user nor the model says.
pub const DEFAULT_MAX_LENGTH: usize = 128;

/// What a model input receives from a sentence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextField {
    /// The token ids.
    Ids,
    /// 1 for a token, 0 for padding.
    Mask,
    /// The token type (segment) ids.
    TypeIds,
}

impl TextField {
    /// The field an input of this name takes: `*mask*` the attention mask,
    /// `*type*` or `*segment*` the token types, anything else the ids.
    pub fn of_input(name: &str) -> TextField {
        let n = name.to_ascii_lowercase();
        if n.contains("mask") {
            TextField::Mask
        } else if n.contains("type") || n.contains("segment") {
            TextField::TypeIds
        } else {
            TextField::Ids
        }
    }
}

/// Longest line accepted (bytes): a sentence, not a document.
const MAX_LINE: usize = 1 << 20;

/// The opened sentences: each line's place in the file and the tokenizer.
#[derive(Debug)]
pub struct Corpus {
    file: PathBuf,
    /// Byte offset and length of each sentence.
    lines: Vec<(u64, usize)>,
    tokenizer: Tokenizer,
    max_length: usize,
    /// The last rows tokenized: every input of a batch reads the same
    /// sentences, so they are read and tokenized once, not once per input.
    last: std::sync::Mutex<Option<Tokenized>>,
}

/// Rows of the file and their encodings.
type Tokenized = (std::ops::Range<usize>, Arc<Vec<tokenizers::Encoding>>);

fn format_err(path: &Path, reason: String) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        reason,
    }
}

fn io_err(path: &Path, error: std::io::Error) -> DataError {
    DataError::Io {
        path: path.to_path_buf(),
        action: "read",
        error,
    }
}

impl Corpus {
    /// Opens `source`: loads the tokenizer and indexes the lines, refusing
    /// an empty file, an empty or over-long line and text that is not UTF-8
    /// (naming the line).
    pub fn open(source: &TextSource, max_length: usize) -> Result<Corpus, DataError> {
        if !(1..=65536).contains(&max_length) {
            return Err(format_err(
                &source.file,
                format!("--max-length {max_length} is out of range; give 1 to 65536 tokens"),
            ));
        }
        let mut tokenizer = Tokenizer::from_file(&source.tokenizer).map_err(|e| {
            format_err(
                &source.tokenizer,
                format!("not a Hugging Face tokenizer.json: {e}"),
            )
        })?;
        let pad = pad_token(&tokenizer).ok_or_else(|| {
            format_err(
                &source.tokenizer,
                "the tokenizer has no padding token ([PAD], <pad> or one set in its padding section); sentences cannot be padded to --max-length".into(),
            )
        })?;
        // Truncation keeps max_length minus the special tokens: at least one must fit.
        let specials = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if max_length <= specials {
            return Err(format_err(
                &source.file,
                format!(
                    "--max-length {max_length} leaves no room for a word: the tokenizer adds {specials} special tokens to each sentence; give at least {}",
                    specials + 1
                ),
            ));
        }
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| format_err(&source.tokenizer, format!("truncation: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            pad_id: pad.0,
            pad_token: pad.1,
            pad_type_id: 0,
            ..Default::default()
        }));
        let lines = index_lines(&source.file)?;
        Ok(Corpus {
            file: source.file.clone(),
            lines,
            tokenizer,
            max_length,
            last: std::sync::Mutex::new(None),
        })
    }

    /// Number of sentences.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether there is no sentence (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Tokens per sentence.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The sentences `range` tokenized, from the last call when it asked
    /// for the same rows.
    fn encodings(
        &self,
        range: std::ops::Range<usize>,
    ) -> Result<Arc<Vec<tokenizers::Encoding>>, DataError> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((r, e)) = last.as_ref()
            && *r == range
        {
            return Ok(e.clone());
        }
        let first = range.start;
        let encodings = self
            .sentences(range.clone())?
            .into_iter()
            .enumerate()
            .map(|(k, s)| {
                self.tokenizer.encode(s, true).map_err(|e| {
                    format_err(
                        &self.file,
                        format!("line {}: the tokenizer failed: {e}", first + k + 1),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let encodings = Arc::new(encodings);
        *last = Some((range, encodings.clone()));
        Ok(encodings)
    }

    /// The sentences `range`, as read from the file.
    pub fn sentences(&self, range: std::ops::Range<usize>) -> Result<Vec<String>, DataError> {
        let mut file = std::fs::File::open(&self.file).map_err(|e| io_err(&self.file, e))?;
        let mut out = Vec::with_capacity(range.len());
        for i in range {
            let (start, len) = self.lines[i];
            file.seek(SeekFrom::Start(start))
                .map_err(|e| io_err(&self.file, e))?;
            let mut bytes = vec![0u8; len];
            file.read_exact(&mut bytes)
                .map_err(|e| io_err(&self.file, e))?;
            out.push(String::from_utf8(bytes).map_err(|_| {
                format_err(
                    &self.file,
                    format!("line {} is not UTF-8 text (the file changed?)", i + 1),
                )
            })?);
        }
        Ok(out)
    }

    /// The most tokens any of the sentences `range` holds, its special
    /// tokens included and the padding not.
    pub fn longest(&self, range: std::ops::Range<usize>) -> Result<usize, DataError> {
        Ok(self
            .encodings(range)?
            .iter()
            .map(|e| e.get_attention_mask().iter().filter(|&&m| m != 0).count())
            .max()
            .unwrap_or(0)
            .max(1))
    }

    /// `field` of the sentences `range` as `[n, width]` of `dtype` (int64
    /// or int32): padded to `max_length`, then the first `width` tokens of
    /// each (all of them when `width` is `max_length`).
    pub fn read(
        &self,
        range: std::ops::Range<usize>,
        field: TextField,
        dtype: DType,
        width: usize,
    ) -> Result<Tensor, DataError> {
        let width = width.min(self.max_length);
        let first = range.start;
        let encodings = self.encodings(range)?;
        let n = encodings.len();
        let mut values: Vec<i64> = Vec::with_capacity(n * self.max_length);
        for (k, e) in encodings.iter().enumerate() {
            let row: Vec<i64> = match field {
                TextField::Ids => e.get_ids().iter().map(|&v| i64::from(v)).collect(),
                TextField::Mask => e
                    .get_attention_mask()
                    .iter()
                    .map(|&v| i64::from(v))
                    .collect(),
                TextField::TypeIds => e.get_type_ids().iter().map(|&v| i64::from(v)).collect(),
            };
            if row.len() != self.max_length {
                return Err(format_err(
                    &self.file,
                    format!(
                        "line {}: {} tokens after padding, not {}",
                        first + k + 1,
                        row.len(),
                        self.max_length
                    ),
                ));
            }
            values.extend_from_slice(&row[..width]);
        }
        let dims = IxDyn(&[n, width]);
        Ok(match dtype {
            DType::I32 => Tensor::I32(
                ArrayD::from_shape_vec(dims, values.into_iter().map(|v| v as i32).collect())
                    .expect("n rows of max_length"),
            ),
            _ => Tensor::I64(ArrayD::from_shape_vec(dims, values).expect("n rows of max_length")),
        })
    }
}

/// The tokenizer's padding token: the one its padding section sets, else
/// `[PAD]` or `<pad>` from its vocabulary.
fn pad_token(t: &Tokenizer) -> Option<(u32, String)> {
    if let Some(p) = t.get_padding() {
        return Some((p.pad_id, p.pad_token.clone()));
    }
    ["[PAD]", "<pad>"]
        .iter()
        .find_map(|s| Some((t.token_to_id(s)?, s.to_string())))
}

/// Each line's byte offset and length (without its `\n` / `\r\n`).
fn index_lines(path: &Path) -> Result<Vec<(u64, usize)>, DataError> {
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut reader = BufReader::new(file);
    let mut lines = Vec::new();
    let mut offset = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = reader
            .by_ref()
            .take(MAX_LINE as u64 + 2)
            .read_until(b'\n', &mut buf)
            .map_err(|e| io_err(path, e))?;
        if read == 0 {
            break;
        }
        let number = lines.len() + 1;
        let mut text = buf.as_slice();
        let ended = text.last() == Some(&b'\n');
        if ended {
            text = &text[..text.len() - 1];
        }
        if text.last() == Some(&b'\r') {
            text = &text[..text.len() - 1];
        }
        if !ended && read > MAX_LINE {
            return Err(format_err(
                path,
                format!(
                    "line {number} is longer than {MAX_LINE} bytes; give one sentence per line"
                ),
            ));
        }
        if std::str::from_utf8(text).is_err() {
            return Err(format_err(
                path,
                format!("line {number} is not UTF-8 text; save the file as UTF-8"),
            ));
        }
        if text.iter().all(u8::is_ascii_whitespace) {
            return Err(format_err(
                path,
                format!("line {number} is empty; give one sentence per line, without blank lines"),
            ));
        }
        lines.push((offset, text.len()));
        offset += read as u64;
    }
    if lines.is_empty() {
        return Err(format_err(path, "the file holds no sentence".into()));
    }
    Ok(lines)
}

/// One model input's column of a [`Corpus`].
#[derive(Clone, Debug)]
pub struct TextColumn {
    /// The shared sentences.
    pub corpus: Arc<Corpus>,
    /// What the input receives.
    pub field: TextField,
    /// Its element type (int64 unless the model declares int32).
    pub dtype: DType,
}

impl TextColumn {
    /// `[sentences, max_length]`.
    pub fn shape(&self) -> Vec<usize> {
        vec![self.corpus.len(), self.corpus.max_length()]
    }

    /// The rows `range`, `width` tokens each (see [`Corpus::read`]).
    pub fn read(&self, range: std::ops::Range<usize>, width: usize) -> Result<Tensor, DataError> {
        self.corpus.read(range, self.field, self.dtype, width)
    }
}
