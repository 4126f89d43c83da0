//! Jane Austen's *Pride and Prejudice* (public domain), embedded in the binary, as characters
//! for next-token prediction: a character tokenizer, a fixed train/validation split, and blocks
//! of tokens for Fabric's data loader. See `data/PROVENANCE.md`.

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use flate2::read::GzDecoder;
use std::io::Read;
use std::sync::Arc;

const TEXT_GZ: &[u8] = include_bytes!("../data/pride-and-prejudice.txt.gz");

/// The share of the text, at its end, kept for validation.
pub const VALIDATION_SHARE: f64 = 0.1;

/// The text could not be read, or text to encode has a character the vocabulary lacks.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// The embedded file is not gzip-compressed UTF-8 (a corrupted build).
    #[error("embedded text: {0}")]
    Embedded(String),
    /// A character outside the vocabulary.
    #[error("character {0:?} is not in the vocabulary (the text's {1} characters)")]
    Unknown(char, usize),
}

/// The whole novel.
pub fn load() -> Result<String, TextError> {
    let mut text = String::new();
    GzDecoder::new(TEXT_GZ)
        .read_to_string(&mut text)
        .map_err(|e| TextError::Embedded(e.to_string()))?;
    Ok(text)
}

/// One token per character: the vocabulary is the text's distinct characters, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharTokenizer {
    chars: Vec<char>,
}

impl CharTokenizer {
    /// The tokenizer of `text`'s characters.
    pub fn new(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Self { chars }
    }

    /// Number of tokens.
    pub fn vocab_size(&self) -> usize {
        self.chars.len()
    }

    /// The token of each character of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        text.chars()
            .map(|c| {
                self.chars
                    .binary_search(&c)
                    .map(|i| i as u32)
                    .map_err(|_| TextError::Unknown(c, self.chars.len()))
            })
            .collect()
    }

    /// The characters of `tokens` (U+FFFD for an id outside the vocabulary).
    pub fn decode(&self, tokens: &[u32]) -> String {
        let char_of = |&t: &u32| self.chars.get(t as usize).copied();
        tokens
            .iter()
            .map(|t| char_of(t).unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect()
    }
}

/// The tokenized text, split by position: the first 90% trains, the last 10% validates.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The text's tokenizer.
    pub tokenizer: CharTokenizer,
    /// Training tokens.
    pub train: Arc<[u32]>,
    /// Validation tokens.
    pub valid: Arc<[u32]>,
}

impl Corpus {
    /// The embedded novel, tokenized and split.
    pub fn load() -> Result<Self, TextError> {
        let text = load()?;
        let tokenizer = CharTokenizer::new(&text);
        let tokens = tokenizer.encode(&text)?;
        let split = tokens.len() - (tokens.len() as f64 * VALIDATION_SHARE) as usize;
        Ok(Self {
            train: tokens[..split].into(),
            valid: tokens[split..].into(),
            tokenizer,
        })
    }
}

/// Consecutive, non-overlapping blocks of a token sequence: item `i` holds the `block_size + 1`
/// tokens from `i * block_size` (inputs are its first `block_size`, targets its last).
#[derive(Debug, Clone)]
pub struct TokenBlocks {
    tokens: Arc<[u32]>,
    block_size: usize,
    len: usize,
}

impl TokenBlocks {
    /// The blocks of `tokens`, at most `limit` of them (`None`: all).
    pub fn new(tokens: Arc<[u32]>, block_size: usize, limit: Option<usize>) -> Self {
        let all = match block_size {
            0 => 0,
            _ => tokens.len().saturating_sub(1) / block_size,
        };
        let len = limit.map_or(all, |limit| limit.min(all));
        Self {
            tokens,
            block_size,
            len,
        }
    }
}

impl Dataset<Vec<u32>> for TokenBlocks {
    fn get(&self, index: usize) -> Option<Vec<u32>> {
        if index >= self.len {
            return None;
        }
        let start = index * self.block_size;
        Some(self.tokens[start..start + self.block_size + 1].to_vec())
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// A batch of blocks: each target is the token after its input.
#[derive(Debug, Clone)]
pub struct TokenBatch<B: Backend> {
    /// `[batch, block_size]`
    pub inputs: Tensor<B, 2, Int>,
    /// `[batch, block_size]`
    pub targets: Tensor<B, 2, Int>,
}

/// Stacks [`TokenBlocks`] items into a [`TokenBatch`] on a device.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenBatcher;

impl<B: Backend> Batcher<B, Vec<u32>, TokenBatch<B>> for TokenBatcher {
    fn batch(&self, items: Vec<Vec<u32>>, device: &B::Device) -> TokenBatch<B> {
        let n = items.len();
        let block = items.first().map_or(0, |b| b.len().saturating_sub(1));
        let (mut inputs, mut targets) = (Vec::with_capacity(n * block), Vec::new());
        for item in &items {
            inputs.extend(item[..block].iter().map(|&t| t as i64));
            targets.extend(item[1..].iter().map(|&t| t as i64));
        }
        TokenBatch {
            inputs: Tensor::from_data(TensorData::new(inputs, [n, block]), device),
            targets: Tensor::from_data(TensorData::new(targets, [n, block]), device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_novel_tokenizes_and_splits() {
        let corpus = Corpus::load().unwrap();
        assert_eq!(corpus.tokenizer.vocab_size(), 75);
        assert_eq!(corpus.train.len() + corpus.valid.len(), 684_768);
        assert_eq!(corpus.valid.len(), 68_476);
        let start = corpus.tokenizer.decode(&corpus.train[..19]);
        assert_eq!(start, "PRIDE AND PREJUDICE");
    }

    #[test]
    fn encode_decode_round_trip_and_unknown_characters() {
        let tokenizer = CharTokenizer::new("hello, world");
        assert_eq!(tokenizer.vocab_size(), 9);
        let tokens = tokenizer.encode("low, hello").unwrap();
        assert_eq!(tokenizer.decode(&tokens), "low, hello");
        assert!(matches!(
            tokenizer.encode("hi"),
            Err(TextError::Unknown('i', 9))
        ));
        assert_eq!(tokenizer.decode(&[99]), "\u{fffd}");
    }

    #[test]
    fn blocks_shift_targets_by_one() {
        let tokens: Arc<[u32]> = (0..10).collect::<Vec<_>>().into();
        let blocks = TokenBlocks::new(tokens.clone(), 4, None);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks.get(1), Some(vec![4, 5, 6, 7, 8]));
        assert_eq!(blocks.get(2), None);
        assert_eq!(TokenBlocks::new(tokens, 4, Some(1)).len(), 1);
        let batch: TokenBatch<burn_fabric::DefaultBackend> =
            TokenBatcher.batch(vec![vec![1, 2, 3], vec![4, 5, 6]], &Default::default());
        let targets = batch.targets.into_data().convert::<i64>().to_vec::<i64>();
        assert_eq!(targets.unwrap(), vec![2, 3, 5, 6]);
    }
}
