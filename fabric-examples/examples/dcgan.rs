//! DCGAN on the UCI handwritten digits (8×8): a convolutional generator and discriminator, each
//! with its own Adam optimizer, set up in one Fabric and trained with the usual alternating
//! steps. Rank 0 writes a PNG grid of samples per epoch.
//!
//! ```text
//! cargo run --release -p fabric-examples --example dcgan -- --devices 2
//! ```
//!
//! Printed per epoch: the discriminator's and the generator's losses, the discriminator's mean
//! belief that real and generated digits are real, and how far the mean generated digit is from
//! the mean real digit (mean absolute pixel difference on the [-1, 1] scale; the first value is
//! the untrained generator's).

use burn::data::dataset::InMemDataset;
use burn::module::{AutodiffModule, Module};
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::optim::AdamConfig;
use burn::tensor::activation::{leaky_relu, relu, sigmoid, softplus, tanh};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use burn_fabric::BackendDevices;
use burn_fabric::prelude::*;
use clap::Parser;
use fabric_examples::args::FabricArgs;
use fabric_examples::digits::{self, DigitBatcher, PIXELS};
use fabric_examples::noise::{self, rank_rng};
use fabric_examples::progress;
use std::error::Error;
use std::path::{Path, PathBuf};

/// Side of a digit in pixels.
const SIDE: usize = 8;
/// Samples in the PNG grid (8 × 8).
const GRID: usize = 8;
/// Each digit pixel becomes a `ZOOM` × `ZOOM` block in the PNG.
const ZOOM: usize = 4;

/// Train a DCGAN on the UCI digits with burn-fabric.
#[derive(Parser, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub fabric: FabricArgs,
    /// Adam learning rate of the generator (betas 0.5, 0.999 as in DCGAN)
    #[arg(long, default_value_t = 1e-4)]
    pub lr_g: f64,
    /// Adam learning rate of the discriminator (faster than the generator's: the two
    /// time-scale rule)
    #[arg(long, default_value_t = 4e-4)]
    pub lr_d: f64,
    /// Size of the generator's latent vector
    #[arg(long, default_value_t = 32)]
    pub latent: usize,
    /// Where rank 0 writes `epoch-NNN.png`
    #[arg(long, default_value = "runs/dcgan")]
    pub out_dir: PathBuf,
}

/// latent → 64×2×2 → 32×4×4 → 1×8×8, pixels in [-1, 1]; batch norm before each ReLU, as in
/// DCGAN (per rank: Lightning's DCGAN does not synchronise batch statistics either).
#[derive(Module, Debug)]
pub struct Generator<B: Backend> {
    project: Linear<B>,
    norm0: BatchNorm<B>,
    up1: ConvTranspose2d<B>,
    norm1: BatchNorm<B>,
    up2: ConvTranspose2d<B>,
}

impl<B: Backend> Generator<B> {
    pub fn new(latent: usize, device: &B::Device) -> Self {
        let up = |from, to| {
            ConvTranspose2dConfig::new([from, to], [4, 4])
                .with_stride([2, 2])
                .with_padding([1, 1])
                .init(device)
        };
        Self {
            project: LinearConfig::new(latent, 64 * 2 * 2).init(device),
            norm0: BatchNormConfig::new(64).init(device),
            up1: up(64, 32),
            norm1: BatchNormConfig::new(32).init(device),
            up2: up(32, 1),
        }
    }

    /// Digits `[batch, 1, 8, 8]` from latents `[batch, latent]`.
    pub fn forward(&self, latent: Tensor<B, 2>) -> Tensor<B, 4> {
        let [batch, _] = latent.dims();
        let x = self.project.forward(latent).reshape([batch, 64, 2, 2]);
        let x = relu(self.norm0.forward(x));
        let x = relu(self.norm1.forward(self.up1.forward(x)));
        tanh(self.up2.forward(x))
    }
}

/// 1×8×8 → 32×4×4 → 64×2×2 → one logit ("real"). The head also sees the batch's feature
/// spread (ProGAN's minibatch standard deviation), so a generator that draws one digit for
/// every latent is easy to tell apart: the usual cure for mode collapse on data this small.
#[derive(Module, Debug)]
pub struct Discriminator<B: Backend> {
    down1: Conv2d<B>,
    down2: Conv2d<B>,
    head: Linear<B>,
}

impl<B: Backend> Discriminator<B> {
    pub fn new(device: &B::Device) -> Self {
        let down = |from, to| {
            Conv2dConfig::new([from, to], [4, 4])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        Self {
            down1: down(1, 32),
            down2: down(32, 64),
            head: LinearConfig::new(64 * 2 * 2 + 1, 1).init(device),
        }
    }

    /// Logits `[batch, 1]`.
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = leaky_relu(self.down1.forward(images), 0.2);
        let x = leaky_relu(self.down2.forward(x), 0.2).flatten::<2>(1, 3);
        let [batch, _] = x.dims();
        let spread = x
            .clone()
            .var(0)
            .add_scalar(1e-8)
            .sqrt()
            .mean()
            .reshape([1, 1]);
        self.head
            .forward(Tensor::cat(vec![x, spread.expand([batch, 1])], 1))
    }
}

/// What a run measured (means over the last epoch and all ranks).
#[derive(Debug, Clone)]
pub struct Report {
    pub discriminator_loss: f64,
    pub generator_loss: f64,
    /// Mean of sigmoid(D(real)).
    pub real_score: f64,
    /// Mean of sigmoid(D(G(z))).
    pub fake_score: f64,
    /// Before training, then after each epoch: how far the mean generated digit is from the
    /// mean real digit (mean absolute pixel difference on the [-1, 1] scale).
    pub mean_digit_distance: Vec<f64>,
    /// Before training, then after each epoch: the samples' per-pixel spread relative to the
    /// real digits' (near 0 = one digit for every latent, i.e. mode collapse).
    pub spread: Vec<f64>,
    /// The PNG grids rank 0 wrote, one per epoch.
    pub grids: Vec<PathBuf>,
}

fabric_examples::example_main!(Args, Report);

/// Trains on backend `B`.
pub fn run_on<B: AutodiffBackend + BackendDevices>(args: &Args) -> Result<Report, Box<dyn Error>> {
    let mut fabric = args.fabric.builder::<B>("dcgan").build()?;
    fabric.print(fabric.describe());
    let (train, _) = digits::train_test_split(digits::load()?);
    fabric.seed_everything(args.fabric.seed);
    let device = fabric.device().clone();
    let generator = Generator::new(args.latent, &device).fork(&device);
    let discriminator = Discriminator::new(&device).fork(&device);
    if fabric.is_global_zero() {
        std::fs::create_dir_all(&args.out_dir)?;
    }
    let report =
        fabric.launch(|fabric| train_rank(fabric, args, &generator, &discriminator, &train))?;
    fabric.print(format!(
        "untrained -> trained: mean-digit distance {:.3} -> {:.3}, spread {:.2} -> {:.2}; samples in {}",
        report.mean_digit_distance.first().copied().unwrap_or(f64::NAN),
        report.mean_digit_distance.last().copied().unwrap_or(f64::NAN),
        report.spread.first().copied().unwrap_or(f64::NAN),
        report.spread.last().copied().unwrap_or(f64::NAN),
        args.out_dir.display(),
    ));
    Ok(report)
}

fn train_rank<B: AutodiffBackend + BackendDevices>(
    fabric: &mut Fabric<B>,
    args: &Args,
    generator: &Generator<B>,
    discriminator: &Discriminator<B>,
    train: &[digits::Digit],
) -> Result<Report, FabricError> {
    let device = fabric.device().clone();
    // Two models, two optimizers, one Fabric: each `backward` stores the gradients of the model
    // it names, and each optimizer steps only its own model.
    let adam = || AdamConfig::new().with_beta_1(0.5);
    let (mut generator, mut opt_g) = fabric.setup(generator.clone(), adam().init())?;
    let (mut discriminator, mut opt_d) = fabric.setup(discriminator.clone(), adam().init())?;
    let mut loader = fabric.setup_dataloader(
        DataLoader::new(InMemDataset::new(train.to_vec()), DigitBatcher)
            .batch_size(args.fabric.batch_size)
            .shuffle(true)
            .drop_last(true),
    )?;
    let mut rng = rank_rng(args.fabric.seed, fabric.global_rank());
    // The same noise every epoch (and on every rank), so the grids show one sample evolving.
    let fixed = noise::normal(
        &mut rank_rng(args.fabric.seed, usize::MAX),
        256 * args.latent,
    );
    let fixed = Tensor::<B::InnerBackend, 2>::from_data(
        TensorData::new(fixed, [256, args.latent]),
        &device,
    );
    let real = PixelStats::of_real(train);

    let epochs = args.fabric.epochs;
    let progress = progress::bar(fabric, (epochs * loader.len()) as u64, "steps");
    // Sampling goes through `fabric.forward` too: under `*-mixed` the half-precision view shares
    // BatchNorm's running statistics with the model (Burn's `RunningState`), so they are kept in
    // the compute dtype and a bare f32 forward would meet half-precision statistics.
    let untrained =
        PixelStats::of_samples(
            &fabric.forward(&generator.valid(), fixed.clone(), |m, x| m.forward(x)),
        );
    let mut distances = vec![untrained.mean_distance(&real)];
    let mut spread = vec![untrained.spread(&real)];
    let mut grids = Vec::new();
    let mut last = [f64::NAN; 4];
    for epoch in 1..=epochs {
        let mut sums = [0.0; 4];
        let mut batches = 0usize;
        for batch in loader.iter() {
            let [n, _] = batch.images.dims();
            let real = batch
                .images
                .mul_scalar(2.0)
                .sub_scalar(1.0)
                .reshape([n, 1, SIDE, SIDE]);
            let latent = Tensor::<B, 2>::from_data(
                TensorData::new(noise::normal(&mut rng, n * args.latent), [n, args.latent]),
                &device,
            );

            // Discriminator: real digits are real, generated ones fake.
            // Every forward goes through `fabric.forward`, so `--precision *-mixed` applies.
            let fake = fabric.forward(&generator, latent.clone(), |m, x| m.forward(x));
            let real_logits = fabric.forward(&discriminator, real, |m, x| m.forward(x));
            let fake_logits = fabric.forward(&discriminator, fake.detach(), |m, x| m.forward(x));
            let real_score = mean(sigmoid(real_logits.clone()));
            let fake_score = mean(sigmoid(fake_logits.clone()));
            let loss_d =
                softplus(real_logits.neg(), 1.0).mean() + softplus(fake_logits, 1.0).mean();
            let loss_d_value = mean(loss_d.clone());
            fabric.backward(loss_d, &discriminator)?;
            discriminator = opt_d.step(args.lr_d, discriminator)?;

            // Generator: make the (updated) discriminator call its digits real.
            let fake = fabric.forward(&generator, latent, |m, x| m.forward(x));
            let logits = fabric.forward(&discriminator, fake, |m, x| m.forward(x));
            let loss_g = softplus(logits.neg(), 1.0).mean();
            let loss_g_value = mean(loss_g.clone());
            fabric.backward(loss_g, &generator)?;
            generator = opt_g.step(args.lr_g, generator)?;
            // The generator step also left gradients on the discriminator's parameters in the
            // graph; Fabric stored only the generator's, so nothing leaks into the next D step.

            for (sum, value) in
                sums.iter_mut()
                    .zip([loss_d_value, loss_g_value, real_score, fake_score])
            {
                *sum += value;
            }
            batches += 1;
            progress.inc(1);
        }
        for (slot, sum) in last.iter_mut().zip(sums) {
            *slot = fabric.all_reduce_scalar(sum / batches.max(1) as f64, ReduceOp::Mean)?;
        }
        let samples = fabric.forward(&generator.valid(), fixed.clone(), |m, x| m.forward(x));
        let stats = PixelStats::of_samples(&samples);
        distances.push(stats.mean_distance(&real));
        spread.push(stats.spread(&real));
        if fabric.is_global_zero() {
            let path = args.out_dir.join(format!("epoch-{epoch:03}.png"));
            write_grid(&samples, &path).map_err(|e| FabricError::Data {
                context: "dcgan samples",
                message: format!("{}: {e}", path.display()),
            })?;
            grids.push(path);
        }
        let [d, g, real, fake] = last;
        progress.suspend(|| {
            fabric.print(format!(
                "epoch {epoch}/{epochs}  loss D {d:.3}  loss G {g:.3}  D(real) {real:.3}  D(fake) {fake:.3}  mean-digit distance {:.3}  spread {:.2}",
                distances[epoch], spread[epoch]
            ))
        });
    }
    progress.finish_and_clear();
    let [discriminator_loss, generator_loss, real_score, fake_score] = last;
    Ok(Report {
        discriminator_loss,
        generator_loss,
        real_score,
        fake_score,
        mean_digit_distance: distances,
        spread,
        grids,
    })
}

fn mean<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> f64 {
    tensor.mean().into_scalar().elem::<f64>()
}

/// Per-pixel mean and standard deviation of a set of digits on the [-1, 1] scale.
#[derive(Debug, Clone)]
struct PixelStats {
    mean: Vec<f64>,
    std: Vec<f64>,
}

impl PixelStats {
    fn of(digits: &[f32]) -> Self {
        let n = (digits.len() / PIXELS).max(1) as f64;
        let mut mean = vec![0.0; PIXELS];
        let mut square = vec![0.0; PIXELS];
        for digit in digits.chunks(PIXELS) {
            for (p, &v) in digit.iter().enumerate() {
                mean[p] += f64::from(v) / n;
                square[p] += f64::from(v) * f64::from(v) / n;
            }
        }
        let std = mean
            .iter()
            .zip(&square)
            .map(|(m, s)| (s - m * m).max(0.0).sqrt())
            .collect();
        Self { mean, std }
    }

    fn of_real(train: &[digits::Digit]) -> Self {
        let pixels: Vec<f32> = train
            .iter()
            .flat_map(|d| d.pixels.map(|p| p / 16.0 * 2.0 - 1.0))
            .collect();
        Self::of(&pixels)
    }

    fn of_samples<B: Backend>(samples: &Tensor<B, 4>) -> Self {
        let data = samples.clone().into_data().convert::<f32>();
        Self::of(data.as_slice::<f32>().unwrap_or(&[]))
    }

    /// Mean absolute difference of the mean digits, per pixel.
    fn mean_distance(&self, real: &Self) -> f64 {
        let sum: f64 = self
            .mean
            .iter()
            .zip(&real.mean)
            .map(|(a, b)| (a - b).abs())
            .sum();
        sum / PIXELS as f64
    }

    /// Summed per-pixel spread relative to the real digits' (1 = as varied as the data; a
    /// collapsed generator drawing one digit for every latent scores near 0).
    fn spread(&self, real: &Self) -> f64 {
        self.std.iter().sum::<f64>() / real.std.iter().sum::<f64>().max(1e-12)
    }
}

/// Writes the first 64 samples as an 8 × 8 grid of digits, white on black, each pixel
/// `ZOOM`× enlarged, with a one-digit-pixel gap between digits.
fn write_grid<B: Backend>(samples: &Tensor<B, 4>, path: &Path) -> Result<(), Box<dyn Error>> {
    let data = samples.clone().into_data().convert::<f32>();
    let pixels = data.as_slice::<f32>().map_err(|e| format!("{e:?}"))?;
    let cell = (SIDE + 1) * ZOOM;
    let side = GRID * cell;
    let mut image = vec![0u8; side * side];
    for (index, digit) in pixels.chunks(PIXELS).take(GRID * GRID).enumerate() {
        let (top, left) = ((index / GRID) * cell, (index % GRID) * cell);
        for (p, value) in digit.iter().enumerate() {
            let grey = (((value + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8;
            for dy in 0..ZOOM {
                let row = top + (p / SIDE) * ZOOM + dy;
                let start = row * side + left + (p % SIDE) * ZOOM;
                image[start..start + ZOOM].fill(grey);
            }
        }
    }
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut encoder = png::Encoder::new(file, side as u32, side as u32);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&image)?;
    Ok(())
}
