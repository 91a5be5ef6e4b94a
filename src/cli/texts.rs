//! The text arguments shared by `calibrate`, `auto`, `compare` and `qat`:
//! `--texts FILE` with `--tokenizer` and `--max-length`.

use super::Failure;
use super::exit::usage;
use crate::data::TextSource;
use std::path::{Path, PathBuf};

/// Where sentences come from and how they are tokenized.
#[derive(Debug, Default, clap::Args)]
pub struct TextArgs {
    /// Sentences, one per line (UTF-8), as the data of a text model, instead
    /// of --data: tokenized with --tokenizer, the token ids, attention mask
    /// and token types fed to the inputs by their names.
    #[arg(long, value_name = "FILE")]
    pub texts: Option<PathBuf>,
    /// The Hugging Face tokenizer.json that --texts (and --eval-texts) use.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Tokens per sentence, truncated and padded (default: the model
    /// input's sequence length when it is fixed, else 128).
    #[arg(long, value_name = "N", value_parser = super::at_least_one())]
    pub max_length: Option<usize>,
}

impl TextArgs {
    /// The sentences of `file` as these flags tokenize them.
    pub fn source(&self, file: &Path) -> Result<TextSource, Failure> {
        let tokenizer = self.tokenizer.clone().ok_or_else(|| {
            usage(format!(
                "--texts {}: give the model's tokenizer with --tokenizer tokenizer.json",
                file.display()
            ))
        })?;
        Ok(TextSource {
            file: file.to_path_buf(),
            tokenizer,
            max_length: self.max_length,
        })
    }

    /// Refuses --tokenizer or --max-length without any text to apply them to.
    pub fn check_used(&self, eval_texts: Option<&PathBuf>) -> Result<(), Failure> {
        if self.texts.is_none()
            && eval_texts.is_none()
            && (self.tokenizer.is_some() || self.max_length.is_some())
        {
            return Err(usage(
                "--tokenizer and --max-length apply to --texts (or --eval-texts); give the sentences too".into(),
            ));
        }
        Ok(())
    }
}
