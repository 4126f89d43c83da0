//! The UCI handwritten digits (8×8 images, 10 classes), embedded in the binary. See
//! `data/PROVENANCE.md`.

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};
use flate2::read::GzDecoder;
use std::io::Read;

const DIGITS_CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// Pixels per image.
pub const PIXELS: usize = 64;
/// Number of classes.
pub const CLASSES: usize = 10;

/// One image and its label.
#[derive(Debug, Clone, PartialEq)]
pub struct Digit {
    /// Pixel intensities 0..=16, row-major.
    pub pixels: [f32; PIXELS],
    /// The digit shown, 0..=9.
    pub label: u8,
}

/// The embedded file could not be read (a corrupted build).
#[derive(Debug, thiserror::Error)]
#[error("digits data, line {line}: {message}")]
pub struct DigitsError {
    line: usize,
    message: String,
}

/// All 1,797 digits in file order.
pub fn load() -> Result<Vec<Digit>, DigitsError> {
    let mut text = String::new();
    GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| DigitsError {
            line: 0,
            message: e.to_string(),
        })?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            parse(line).map_err(|message| DigitsError {
                line: i + 1,
                message,
            })
        })
        .collect()
}

fn parse(line: &str) -> Result<Digit, String> {
    let values: Vec<f32> = line
        .split(',')
        .map(|v| v.trim().parse::<f32>().map_err(|e| format!("`{v}`: {e}")))
        .collect::<Result<_, _>>()?;
    if values.len() != PIXELS + 1 {
        return Err(format!(
            "expected {} values, found {}",
            PIXELS + 1,
            values.len()
        ));
    }
    let label = values[PIXELS];
    if !(0.0..CLASSES as f32).contains(&label) || label.fract() != 0.0 {
        return Err(format!("label {label} is not a digit"));
    }
    let mut pixels = [0.0; PIXELS];
    pixels.copy_from_slice(&values[..PIXELS]);
    Ok(Digit {
        pixels,
        label: label as u8,
    })
}

/// A fixed train/test split: every fifth digit (by file order) is a test digit, so 1,438 train
/// and 359 test, with all writers and classes on both sides.
pub fn train_test_split(digits: Vec<Digit>) -> (Vec<Digit>, Vec<Digit>) {
    let (test, train): (Vec<_>, Vec<_>) = digits
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 5 == 4);
    (
        train.into_iter().map(|(_, d)| d).collect(),
        test.into_iter().map(|(_, d)| d).collect(),
    )
}

/// A batch: images scaled to `[0, 1]` and labels.
#[derive(Debug, Clone)]
pub struct DigitBatch<B: Backend> {
    /// `[batch, 64]`
    pub images: Tensor<B, 2>,
    /// `[batch]`
    pub labels: Tensor<B, 1, Int>,
}

/// Stacks digits into a [`DigitBatch`] on a device.
#[derive(Debug, Clone, Copy, Default)]
pub struct DigitBatcher;

impl<B: Backend> Batcher<B, Digit, DigitBatch<B>> for DigitBatcher {
    fn batch(&self, items: Vec<Digit>, device: &B::Device) -> DigitBatch<B> {
        let n = items.len();
        let pixels: Vec<f32> = items
            .iter()
            .flat_map(|d| d.pixels.map(|p| p / 16.0))
            .collect();
        let labels: Vec<i64> = items.iter().map(|d| d.label as i64).collect();
        DigitBatch {
            images: Tensor::from_data(TensorData::new(pixels, [n, PIXELS]), device),
            labels: Tensor::from_data(TensorData::new(labels, [n]), device),
        }
    }
}

/// [`DigitBatcher`] with the images cast to a dtype: a model that runs its own forward pass (a
/// burn-train `TrainStep`) needs its inputs in the precision's compute dtype
/// (`Fabric::compute_dtype`), since Burn does not promote dtypes.
#[derive(Debug, Clone, Copy)]
pub struct CastDigitBatcher(pub FloatDType);

impl<B: Backend> Batcher<B, Digit, DigitBatch<B>> for CastDigitBatcher {
    fn batch(&self, items: Vec<Digit>, device: &B::Device) -> DigitBatch<B> {
        let batch: DigitBatch<B> = DigitBatcher.batch(items, device);
        DigitBatch {
            images: batch.images.cast(self.0),
            labels: batch.labels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_all_digits_with_every_class() {
        let digits = load().unwrap();
        assert_eq!(digits.len(), 1797);
        for class in 0..CLASSES as u8 {
            assert!(digits.iter().filter(|d| d.label == class).count() > 150);
        }
        assert!(
            digits
                .iter()
                .all(|d| d.pixels.iter().all(|p| (0.0..=16.0).contains(p)))
        );
        let (train, test) = train_test_split(digits);
        assert_eq!((train.len(), test.len()), (1438, 359));
    }

    #[test]
    fn bad_lines_are_reported() {
        assert!(parse("1,2,3").unwrap_err().contains("expected 65"));
        let mut line = vec!["0"; 64].join(",");
        line.push_str(",11");
        assert!(parse(&line).unwrap_err().contains("not a digit"));
    }
}
