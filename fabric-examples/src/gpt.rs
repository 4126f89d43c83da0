//! A decoder-only transformer (GPT) from Burn's `nn` modules: token and position embeddings,
//! pre-norm blocks of causal multi-head attention and an MLP, a final LayerNorm and an untied
//! output head. Each block runs as an FSDP unit ([`burn_fabric::unit`]); outside FSDP that is a
//! plain call.

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::attention::{MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Gelu, Initializer, LayerNorm,
    LayerNormConfig, Linear, LinearConfig,
};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, ElementConversion, Int, Tensor};
use burn_fabric::FabricError;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// A preset model size (`--size`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// 2 layers, 2 heads, width 64, block 64 (~0.1M parameters): trains in seconds on a CPU.
    Tiny,
    /// 4 layers, 4 heads, width 256, block 128 (~3.2M).
    Small,
    /// 8 layers, 8 heads, width 768, block 256 (~57M).
    Base,
    /// 24 layers, 16 heads, width 1024, block 256 (~302M).
    Large,
}

impl Size {
    /// `(layers, heads, embed, block_size)`.
    fn shape(self) -> (usize, usize, usize, usize) {
        match self {
            Size::Tiny => (2, 2, 64, 64),
            Size::Small => (4, 4, 256, 128),
            Size::Base => (8, 8, 768, 256),
            Size::Large => (24, 16, 1024, 256),
        }
    }

    /// A learning rate for AdamW that suits the size.
    pub fn learning_rate(self) -> f64 {
        match self {
            Size::Tiny => 3e-3,
            Size::Small => 1e-3,
            Size::Base => 3e-4,
            Size::Large => 2e-4,
        }
    }
}

/// The model's shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Longest context (positions embedded).
    pub block_size: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads per block (they divide `embed`).
    pub heads: usize,
    /// Width of the residual stream.
    pub embed: usize,
    /// Dropout after the embeddings, in attention and after each block's branches.
    pub dropout: f64,
}

impl GptConfig {
    /// The preset `size` for a vocabulary of `vocab_size` tokens, without dropout.
    pub fn preset(size: Size, vocab_size: usize) -> Self {
        let (layers, heads, embed, block_size) = size.shape();
        Self {
            vocab_size,
            block_size,
            layers,
            heads,
            embed,
            dropout: 0.0,
        }
    }

    /// An error naming the first field that cannot make a model.
    pub fn check(&self) -> Result<(), FabricError> {
        let invalid = |name: &'static str, value: usize, reason: &str| {
            Err(FabricError::InvalidArgument {
                name,
                value: value.to_string(),
                reason: reason.into(),
            })
        };
        for (name, value) in [
            ("block_size", self.block_size),
            ("layers", self.layers),
            ("heads", self.heads),
            ("vocab_size", self.vocab_size),
        ] {
            if value == 0 {
                return invalid(name, value, "must be at least 1");
            }
        }
        if self.embed == 0 || !self.embed.is_multiple_of(self.heads) {
            let reason = format!("must be a positive multiple of the heads ({})", self.heads);
            return invalid("embed", self.embed, &reason);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(FabricError::InvalidArgument {
                name: "dropout",
                value: self.dropout.to_string(),
                reason: "must be in [0, 1)".into(),
            });
        }
        Ok(())
    }

    /// The model, with lazy parameters: Burn draws each when first used, so a model set up
    /// under FSDP is drawn one parameter at a time on rank 0 and never held whole.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Gpt<B> {
        let embedding = |n| {
            EmbeddingConfig::new(n, self.embed)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device)
        };
        Gpt {
            token: embedding(self.vocab_size),
            position: embedding(self.block_size),
            blocks: (0..self.layers).map(|_| self.block(device)).collect(),
            norm: LayerNormConfig::new(self.embed).init(device),
            head: LinearConfig::new(self.embed, self.vocab_size).init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
        }
    }

    fn block<B: Backend>(&self, device: &B::Device) -> Block<B> {
        Block {
            norm_attn: LayerNormConfig::new(self.embed).init(device),
            attn: MultiHeadAttentionConfig::new(self.embed, self.heads)
                .with_dropout(self.dropout)
                .init(device),
            norm_mlp: LayerNormConfig::new(self.embed).init(device),
            fc: LinearConfig::new(self.embed, 4 * self.embed).init(device),
            proj: LinearConfig::new(4 * self.embed, self.embed).init(device),
            gelu: Gelu::new(),
            dropout: DropoutConfig::new(self.dropout).init(),
        }
    }
}

/// The transformer; [`forward`](Gpt::forward) maps token ids to next-token logits.
#[derive(Module, Debug)]
pub struct Gpt<B: Backend> {
    token: Embedding<B>,
    position: Embedding<B>,
    blocks: Vec<Block<B>>,
    norm: LayerNorm<B>,
    head: Linear<B>,
    dropout: Dropout,
}

/// One pre-norm block: `x + attn(ln(x))`, then `x + mlp(ln(x))`.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    norm_attn: LayerNorm<B>,
    attn: MultiHeadAttention<B>,
    norm_mlp: LayerNorm<B>,
    fc: Linear<B>,
    proj: Linear<B>,
    gelu: Gelu,
    dropout: Dropout,
}

impl<B: Backend> Block<B> {
    /// `[batch, len, embed]` to the same, attending only to earlier positions (`mask`).
    pub fn forward(&self, x: Tensor<B, 3>, mask: Tensor<B, 3, Bool>) -> Tensor<B, 3> {
        let input = MhaInput::self_attn(self.norm_attn.forward(x.clone())).mask_attn(mask);
        let x = x + self.dropout.forward(self.attn.forward(input).context);
        let hidden = self
            .gelu
            .forward(self.fc.forward(self.norm_mlp.forward(x.clone())));
        x + self.dropout.forward(self.proj.forward(hidden))
    }
}

impl<B: Backend> Gpt<B> {
    /// Logits `[batch, len, vocab]` of the token after each position of `tokens`
    /// `[batch, len]`; `len` must not exceed the block size. Each block is an FSDP unit.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [batch, len] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<B, 1, Int>::arange(0..len as i64, &device)
            .reshape([1, len])
            .repeat_dim(0, batch);
        let x = self.token.forward(tokens) + self.position.forward(positions);
        let mut x = self.dropout.forward(x);
        let mask = generate_autoregressive_mask::<B>(batch, len, &device);
        for block in &self.blocks {
            x = burn_fabric::unit(block, x, |block, x| block.forward(x, mask.clone()));
        }
        self.head.forward(self.norm.forward(x))
    }
}

/// Each block's mean cross-entropy `[batch]` of `logits` `[batch, len, vocab]` against the
/// next tokens `targets` `[batch, len]` (their mean is the usual loss).
pub fn block_losses<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [batch, len, vocab] = logits.dims();
    let log_probs = log_softmax(logits.reshape([batch * len, vocab]), 1);
    let picked = log_probs.gather(1, targets.reshape([batch * len, 1]));
    picked
        .reshape([batch, len])
        .neg()
        .mean_dim(1)
        .reshape([batch])
}

/// How [`generate`] picks each next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// A token drawn from the softmax of the logits divided by `temperature`, with an RNG
    /// seeded by `seed` (the same draws on every rank).
    Temperature {
        /// Above 0; lower is closer to greedy.
        temperature: f64,
        /// The RNG's seed.
        seed: u64,
    },
}

/// `count` tokens continuing `prompt`, each picked by `sampling` given at most the last
/// `block_size` tokens; `logits_of` runs the model on `[1, len]` tokens. Under FSDP every rank
/// must call this alike: every forward pass is collective (and every rank then draws the same
/// tokens).
pub fn generate<B: Backend>(
    prompt: &[u32],
    count: usize,
    block_size: usize,
    sampling: Sampling,
    device: &B::Device,
    mut logits_of: impl FnMut(Tensor<B, 2, Int>) -> Tensor<B, 3>,
) -> Vec<u32> {
    let mut rng = match sampling {
        Sampling::Temperature { seed, .. } => StdRng::seed_from_u64(seed),
        Sampling::Greedy => StdRng::seed_from_u64(0),
    };
    let mut tokens = prompt.to_vec();
    for _ in 0..count {
        let context = &tokens[tokens.len().saturating_sub(block_size.max(1))..];
        if context.is_empty() {
            break;
        }
        let ids: Vec<i64> = context.iter().map(|&t| t as i64).collect();
        let input = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), device).reshape([1, ids.len()]);
        let logits = logits_of(input);
        let [_, len, vocab] = logits.dims();
        let last = logits
            .slice([0..1, len - 1..len, 0..vocab])
            .reshape([vocab]);
        let next = match sampling {
            Sampling::Temperature { temperature, .. } if temperature > 0.0 => {
                let probs = softmax(last.div_scalar(temperature), 0).into_data();
                let probs = probs.convert::<f64>().to_vec::<f64>().unwrap_or_default();
                draw(&probs, rng.random::<f64>())
            }
            _ => last.argmax(0).into_scalar().elem::<i64>() as usize,
        };
        tokens.push(next as u32);
    }
    tokens.split_off(prompt.len())
}

/// The index where the running sum of `probs` first exceeds `u` (in `[0, 1)`); the last one
/// when rounding leaves the sum short.
fn draw(probs: &[f64], u: f64) -> usize {
    let mut sum = 0.0;
    for (i, p) in probs.iter().enumerate() {
        sum += p;
        if u < sum {
            return i;
        }
    }
    probs.len().saturating_sub(1)
}

/// The parameters of `model` counted from their shapes, without drawing lazy ones.
pub fn count_params<B: Backend, M: Module<B>>(model: &M) -> usize {
    struct Count(usize);
    impl<B: Backend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 += param.lazy_shape().num_elements();
        }
    }
    let mut count = Count(0);
    model.visit(&mut count);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;
    type B = burn_fabric::DefaultBackend;

    #[test]
    fn presets_have_the_advertised_sizes() {
        let count = |size| {
            let config = GptConfig::preset(size, 75);
            config.check().unwrap();
            count_params(&config.init::<B>(&Default::default()))
        };
        assert_eq!(count(Size::Tiny), 113_867);
        assert!((3_000_000..3_500_000).contains(&count(Size::Small)));
        assert!((30_000_000..100_000_000).contains(&count(Size::Base)));
        assert!((200_000_000..400_000_000).contains(&count(Size::Large)));
    }

    #[test]
    fn the_forward_is_causal() {
        let config = GptConfig::preset(Size::Tiny, 10);
        let model = config.init::<B>(&Default::default());
        let a = Tensor::<B, 2, Int>::from_ints([[1, 2, 3, 4]], &Default::default());
        let b = Tensor::<B, 2, Int>::from_ints([[1, 2, 3, 9]], &Default::default());
        let (a, b) = (model.forward(a), model.forward(b));
        assert_eq!(a.dims(), [1, 4, 10]);
        let early = |t: Tensor<B, 3>| t.slice([0..1, 0..3, 0..10]);
        early(a.clone())
            .into_data()
            .assert_eq(&early(b.clone()).into_data(), true);
        let losses = block_losses(a, Tensor::from_ints([[2, 3, 4, 5]], &Default::default()));
        assert!(losses.into_scalar().elem::<f64>() > 0.0);
        let device = Default::default();
        let greedy = generate::<B>(&[1, 2], 5, 4, Sampling::Greedy, &device, |x| {
            model.forward(x)
        });
        assert_eq!(greedy.len(), 5);
        assert!(greedy.iter().all(|&t| t < 10));
        let seeded = |seed| Sampling::Temperature {
            temperature: 1.0,
            seed,
        };
        let a = generate::<B>(&[1], 8, 4, seeded(3), &device, |x| model.forward(x));
        let b = generate::<B>(&[1], 8, 4, seeded(3), &device, |x| model.forward(x));
        assert_eq!(a, b, "the same seed draws the same tokens");
        assert_eq!(draw(&[0.25, 0.5, 0.25], 0.3), 1);
        assert_eq!(draw(&[0.5, 0.4], 0.95), 1);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut config = GptConfig::preset(Size::Tiny, 75);
        config.heads = 3;
        assert!(config.check().unwrap_err().to_string().contains("embed"));
        config.heads = 0;
        assert!(config.check().is_err());
    }
}
