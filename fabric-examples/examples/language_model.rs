//! Language model: a GPT-style transformer trained on *Pride and Prejudice*, one token per
//! character, with any strategy: the workload FSDP exists for.
//!
//! ```text
//! cargo run --release -p fabric-examples --example language_model -- --devices 2 --strategy fsdp
//! cargo run --release -p fabric-examples --example language_model -- --devices 2 \
//!     --strategy fsdp --size base --precision bf16-mixed --steps-per-epoch 20
//! ```
//!
//! `--size tiny|small|base|large` picks a preset (0.1M to 302M parameters; `--block-size`,
//! `--layers`, `--heads`, `--embed` override it). Each transformer block is an FSDP unit, and
//! under `fsdp` the model is built lazily: `setup` draws it one parameter at a time on rank 0,
//! so no rank ever holds it whole. Prints per epoch the training loss, validation loss and
//! perplexity and the tokens per second of all ranks together; at the end, a continuation of
//! `--prompt` (sampled at `--temperature` with `--seed`, or greedy).

use burn::data::dataset::Dataset;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor};
use burn_fabric::prelude::*;
use burn_fabric::{BackendDevices, Checkpoint, Restore, step_checkpoint};
use clap::Parser;
use fabric_examples::args::FabricArgs;
use fabric_examples::gpt::{self, Gpt, GptConfig, Sampling, Size};
use fabric_examples::progress;
use fabric_examples::text::{Corpus, TokenBatch, TokenBatcher, TokenBlocks};
use std::error::Error;
use std::path::Path;
use std::time::Instant;

/// Train a character-level GPT on Pride and Prejudice with burn-fabric.
#[derive(Parser, Debug, Clone)]
#[command(mut_arg("epochs", |arg| arg.default_value("3")))]
pub struct Args {
    #[command(flatten)]
    pub fabric: FabricArgs,
    /// Model size preset
    #[arg(long, value_enum, default_value_t = Size::Tiny)]
    pub size: Size,
    /// Context length (overrides the preset)
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Transformer blocks (overrides the preset)
    #[arg(long)]
    pub layers: Option<usize>,
    /// Attention heads (overrides the preset; they divide --embed)
    #[arg(long)]
    pub heads: Option<usize>,
    /// Width of the residual stream (overrides the preset)
    #[arg(long)]
    pub embed: Option<usize>,
    /// Dropout rate
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// AdamW learning rate [default: 3e-3 tiny, 1e-3 small, 3e-4 base, 2e-4 large]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Optimizer steps over which the learning rate rises linearly to --lr
    #[arg(long, default_value_t = 20)]
    pub warmup: u64,
    /// Clip the gradients' global norm to this (0: no clipping)
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// At most this many optimizer steps per epoch [default: the whole training text]
    #[arg(long)]
    pub steps_per_epoch: Option<usize>,
    /// Validate on the first N blocks of the validation text [default: all of it]
    #[arg(long)]
    pub val_blocks: Option<usize>,
    /// Start of the generated sample
    #[arg(long, default_value = "Elizabeth")]
    pub prompt: String,
    /// Characters to generate after training (0: none)
    #[arg(long, default_value_t = 200)]
    pub sample_chars: usize,
    /// Sampling temperature of the generated characters, drawn with --seed (0: greedy, the
    /// most likely character each time)
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
}

/// One epoch's numbers, the same on every rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochMetrics {
    /// Epoch, from 1.
    pub epoch: u64,
    /// Mean training loss over the epoch's steps and all ranks (nats per character).
    pub train_loss: f64,
    /// Mean loss over every validation character (each counted once at any world size).
    pub val_loss: f64,
    /// `exp(val_loss)`.
    pub perplexity: f64,
    /// Training tokens of all ranks per second of the epoch's steps.
    pub tokens_per_second: f64,
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Parameters of the model.
    pub params: usize,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// The epochs this run trained (fewer after --resume).
    pub epochs: Vec<EpochMetrics>,
    /// Optimizer steps this run made.
    pub steps: u64,
    /// The generated continuation of the prompt.
    pub sample: String,
}

fabric_examples::example_main!(Args, Report);

/// Trains on backend `B`.
pub fn run_on<B: AutodiffBackend + BackendDevices>(args: &Args) -> Result<Report, Box<dyn Error>> {
    let mut fabric = args.fabric.builder::<B>("language_model").build()?;
    fabric.print(fabric.describe());
    let corpus = Corpus::load()?;
    let prompt = corpus.tokenizer.encode(&args.prompt)?;
    let mut config = GptConfig::preset(args.size, corpus.tokenizer.vocab_size());
    config.block_size = args.block_size.unwrap_or(config.block_size);
    config.layers = args.layers.unwrap_or(config.layers);
    config.heads = args.heads.unwrap_or(config.heads);
    config.embed = args.embed.unwrap_or(config.embed);
    config.dropout = args.dropout;
    config.check()?;
    if TokenBlocks::new(corpus.valid.clone(), config.block_size, args.val_blocks).is_empty() {
        return Err(Box::new(FabricError::InvalidArgument {
            name: "val_blocks",
            value: format!("{:?} (block size {})", args.val_blocks, config.block_size),
            reason: format!(
                "no block of the {} validation characters to validate on",
                corpus.valid.len()
            ),
        }));
    }
    // Lazy parameters: nothing is drawn until rank 0 draws them (`train_rank`), from this seed.
    fabric.seed_everything(args.fabric.seed);
    let model = config.init::<B>(fabric.device());
    let params = gpt::count_params(&model);
    fabric.print(format!(
        "model: {} layers, {} heads, width {}, block {}, vocabulary {}: {params} parameters",
        config.layers, config.heads, config.embed, config.block_size, config.vocab_size
    ));
    let (epochs, steps, sample) =
        fabric.launch(|fabric| train_rank(fabric, args, &config, &model, &corpus, &prompt))?;
    let sample = corpus.tokenizer.decode(&sample);
    fabric.print(format!("sample: {}{sample}", args.prompt));
    Ok(Report {
        params,
        vocab_size: config.vocab_size,
        epochs,
        steps,
        sample,
    })
}

/// One rank's training: its metrics per epoch, its steps and the generated tokens.
fn train_rank<B: AutodiffBackend + BackendDevices>(
    fabric: &mut Fabric<B>,
    args: &Args,
    config: &GptConfig,
    model: &Gpt<B>,
    corpus: &Corpus,
    prompt: &[u32],
) -> Result<(Vec<EpochMetrics>, u64, Vec<u32>), FabricError> {
    // `setup` has rank 0 draw the lazy parameters in visit order from the seed before any other
    // rank, and gives every rank its values (under FSDP one parameter at a time, each rank
    // keeping its rows): every world size and strategy trains the same model.
    let (mut model, mut optimizer) = fabric.setup(model.clone(), AdamWConfig::new().init())?;
    let train = TokenBlocks::new(corpus.train.clone(), config.block_size, None);
    let mut loader = fabric.setup_dataloader(
        DataLoader::new(train, TokenBatcher)
            .batch_size(args.fabric.batch_size)
            .shuffle(true)
            .drop_last(true),
    )?;
    let valid = TokenBlocks::new(corpus.valid.clone(), config.block_size, args.val_blocks);
    let valid_len = valid.len();
    // Padded to the same number of batches on every rank (under FSDP every forward pass is
    // collective); `validate` skips the padding.
    let mut valid_loader = fabric.setup_dataloader(
        DataLoader::<B::InnerBackend, _, _>::new(valid, TokenBatcher)
            .batch_size(args.fabric.batch_size),
    )?;

    let (mut epoch, mut batch_in_epoch, mut global_step) = (0u64, 0usize, 0u64);
    let dir = args.fabric.checkpoint_dir.clone();
    let resume_from = dir
        .as_deref()
        .and_then(|dir| fabric.checkpoint_to_resume(dir, args.fabric.resume));
    if let Some(path) = resume_from {
        fabric.load(
            &path,
            Restore::new()
                .module("model", &mut model)
                .optimizer("optimizer", &mut optimizer)
                .value("epoch", &mut epoch)
                .value("batch", &mut batch_in_epoch)
                .value("global_step", &mut global_step),
        )?;
        fabric.print(format!("resumed from epoch {epoch} step {global_step}"));
    }

    let lr = args.lr.unwrap_or(args.size.learning_rate());
    let epochs = args.fabric.epochs as u64;
    let per_epoch = args
        .steps_per_epoch
        .map_or(loader.len(), |cap| cap.min(loader.len()));
    let total = epochs * per_epoch as u64;
    let progress = progress::bar(fabric, total.saturating_sub(global_step), "steps");
    let tokens_per_step = (args.fabric.batch_size * config.block_size * fabric.world_size()) as f64;
    let (mut metrics, mut steps) = (Vec::new(), 0u64);
    while epoch < epochs {
        loader.set_epoch(epoch);
        let started = Instant::now();
        let (mut loss_sum, mut batches) = (0.0, 0usize);
        let batches_left = per_epoch.saturating_sub(batch_in_epoch);
        for (index, batch) in loader
            .iter()
            .enumerate()
            .skip(batch_in_epoch)
            .take(batches_left)
        {
            let logits = logits(fabric, &model, batch.inputs);
            let loss = gpt::block_losses(logits, batch.targets).mean();
            let loss_value = loss.clone().into_scalar().elem::<f64>();
            fabric.backward(loss, &model)?;
            if args.clip > 0.0 {
                fabric.clip_gradients_norm(&model, args.clip, 2.0)?;
            }
            let warm = (global_step + 1) as f64 / args.warmup.max(1) as f64;
            model = optimizer.step(lr * warm.min(1.0), model)?;
            (global_step, steps) = (global_step + 1, steps + 1);
            (loss_sum, batches) = (loss_sum + loss_value, batches + 1);
            progress.inc(1);
            fabric.log("train/loss", loss_value, global_step)?;
            if let (Some(dir), Some(every)) = (&dir, args.fabric.checkpoint_every)
                && global_step.is_multiple_of(every)
            {
                save(
                    fabric,
                    dir,
                    &model,
                    &optimizer,
                    [epoch, index as u64 + 1, global_step],
                )?;
            }
        }
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        batch_in_epoch = 0;
        epoch += 1;
        // NaN for an epoch of no steps (`--steps-per-epoch 0`: validation only).
        let train_loss = fabric.all_reduce_scalar(loss_sum / batches as f64, ReduceOp::Mean)?;
        let val_loss = validate(fabric, &model.valid(), &mut valid_loader, valid_len)?;
        let tokens_per_second =
            fabric.all_reduce_scalar(batches as f64 * tokens_per_step / seconds, ReduceOp::Mean)?;
        let row = EpochMetrics {
            epoch,
            train_loss,
            val_loss,
            perplexity: val_loss.exp(),
            tokens_per_second,
        };
        fabric.log("train/epoch_loss", train_loss, global_step)?;
        fabric.log("val/loss", val_loss, global_step)?;
        fabric.log("val/perplexity", row.perplexity, global_step)?;
        fabric.log("tokens_per_sec", tokens_per_second, global_step)?;
        progress.suspend(|| {
            fabric.print(format!(
                "epoch {epoch}/{epochs}  train loss {train_loss:.4}  val loss {val_loss:.4}  \
                 perplexity {:.3}  {tokens_per_second:.0} tokens/s",
                row.perplexity
            ))
        });
        metrics.push(row);
        if let Some(dir) = &dir {
            save(fabric, dir, &model, &optimizer, [epoch, 0, global_step])?;
        }
    }
    progress.finish_and_clear();

    // Every rank generates (under FSDP each forward pass gathers from all ranks); rank 0 prints.
    let valid_model = model.valid();
    let sampling = match args.temperature {
        t if t > 0.0 => Sampling::Temperature {
            temperature: t,
            seed: args.fabric.seed,
        },
        _ => Sampling::Greedy,
    };
    let sample = gpt::generate(
        prompt,
        args.sample_chars,
        config.block_size,
        sampling,
        fabric.device(),
        |tokens| logits(fabric, &valid_model, tokens),
    );
    Ok((metrics, steps, sample))
}

/// The model's next-token logits `[batch, len, vocab]` in f32, run in the precision's context
/// (and, under FSDP, gathering the parameters).
fn logits<BT: burn::tensor::backend::Backend, B: AutodiffBackend + BackendDevices>(
    fabric: &Fabric<B>,
    model: &Gpt<BT>,
    tokens: Tensor<BT, 2, Int>,
) -> Tensor<BT, 3> {
    fabric.forward(model, tokens, |m, tokens| m.forward(tokens))
}

/// The mean loss over every character of the validation blocks: each rank runs its share
/// (the same number of batches everywhere), the sampler's padding is left out, and the sums
/// of all ranks are combined.
fn validate<B: AutodiffBackend + BackendDevices>(
    fabric: &Fabric<B>,
    model: &Gpt<B::InnerBackend>,
    loader: &mut RankDataLoader<B::InnerBackend, Vec<u32>, TokenBatch<B::InnerBackend>>,
    blocks: usize,
) -> Result<f64, FabricError> {
    let (rank, world) = (fabric.global_rank(), fabric.world_size());
    let (mut sum, mut count, mut position) = (0.0, 0.0, 0usize);
    for batch in loader.iter() {
        let losses = gpt::block_losses(logits(fabric, model, batch.inputs), batch.targets);
        let losses = losses
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .unwrap_or_default();
        for loss in losses {
            // The sampler gives this rank the blocks at positions rank, rank + world, ... of
            // the list padded with repeats to a multiple of the world size.
            if rank + position * world < blocks {
                (sum, count) = (sum + loss, count + 1.0);
            }
            position += 1;
        }
    }
    let sum = fabric.all_reduce_scalar(sum, ReduceOp::Sum)?;
    let count = fabric.all_reduce_scalar(count, ReduceOp::Sum)?;
    Ok(sum / count.max(1.0))
}

/// Saves what resuming needs: where the loop is (`[epoch, batch, global_step]`), the model and
/// the optimizer.
fn save<B: AutodiffBackend + BackendDevices, O: Optimizer<Gpt<B>, B>>(
    fabric: &Fabric<B>,
    dir: &Path,
    model: &Gpt<B>,
    optimizer: &FabricOptimizer<B, Gpt<B>, O>,
    [epoch, batch, global_step]: [u64; 3],
) -> Result<(), FabricError> {
    let batch = batch as usize;
    fabric.save(
        step_checkpoint(dir, global_step),
        Checkpoint::new()
            .module("model", model)
            .optimizer("optimizer", optimizer)
            .value("epoch", &epoch)
            .value("batch", &batch)
            .value("global_step", &global_step),
    )
}
