//! Advantage actor-critic (A2C) on CartPole, with the cart-pole physics written here (the
//! equations and limits of Gym's `CartPole-v1`: episodes end when the pole leans past 12° or the
//! cart leaves ±2.4, or after 500 steps; reward 1 per step).
//!
//! ```text
//! cargo run --release -p fabric-examples --example reinforcement_learning -- --devices 2
//! ```
//!
//! Each rank steps `--envs` environments for `--rollout` steps with the current policy, then
//! computes the actor-critic loss on its transitions; Fabric averages the gradients, so every
//! rank applies the update of all ranks' experience. Printed per epoch: the mean return of the
//! episodes that ended in it, over all ranks (a random policy scores about 22; 500 is the most).

use burn::module::{AutodiffModule, Module};
use burn::nn::{Linear, LinearConfig};
use burn::optim::AdamConfig;
use burn::tensor::activation::{log_softmax, softmax, tanh};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn_fabric::BackendDevices;
use burn_fabric::prelude::*;
use clap::Parser;
use fabric_examples::args::FabricArgs;
use fabric_examples::noise::rank_rng;
use fabric_examples::progress;
use rand::RngExt;
use rand::rngs::StdRng;
use std::error::Error;

/// A2C on CartPole with burn-fabric.
#[derive(Parser, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub fabric: FabricArgs,
    /// Environments per rank
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub envs: u64,
    /// Steps per environment between updates
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub rollout: u64,
    /// Updates per epoch (`--epochs` sets the number of epochs)
    #[arg(long, default_value_t = 50)]
    pub updates_per_epoch: usize,
    /// Adam learning rate
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Discount factor
    #[arg(long, default_value_t = 0.99)]
    pub gamma: f64,
    /// Weight of the entropy bonus
    #[arg(long, default_value_t = 0.01)]
    pub entropy: f64,
}

/// Gym's `CartPole-v1`: state (x, ẋ, θ, θ̇), actions push left (0) or right (1).
#[derive(Debug, Clone)]
pub struct CartPole {
    state: [f64; 4],
    steps: usize,
    episode_return: f64,
}

impl CartPole {
    const GRAVITY: f64 = 9.8;
    const CART_MASS: f64 = 1.0;
    const POLE_MASS: f64 = 0.1;
    const HALF_LENGTH: f64 = 0.5;
    const FORCE: f64 = 10.0;
    const TAU: f64 = 0.02;
    const X_LIMIT: f64 = 2.4;
    const THETA_LIMIT: f64 = 12.0 * std::f64::consts::PI / 180.0;
    /// Steps after which an episode is cut.
    pub const MAX_STEPS: usize = 500;

    /// A new episode, each state variable uniform in ±0.05.
    pub fn new(rng: &mut StdRng) -> Self {
        Self::from_state(std::array::from_fn(|_| rng.random_range(-0.05..0.05)))
    }

    /// An episode starting from `state` (x, ẋ, θ, θ̇).
    pub fn from_state(state: [f64; 4]) -> Self {
        Self {
            state,
            steps: 0,
            episode_return: 0.0,
        }
    }

    /// The observation the policy sees.
    pub fn observation(&self) -> [f32; 4] {
        self.state.map(|v| v as f32)
    }

    /// Applies `action` for one time step (explicit Euler, as Gym). Returns the reward and, when
    /// the episode ended, its return.
    pub fn step(&mut self, action: usize) -> (f64, Option<f64>) {
        let [x, x_dot, theta, theta_dot] = self.state;
        let force = if action == 1 {
            Self::FORCE
        } else {
            -Self::FORCE
        };
        let total_mass = Self::CART_MASS + Self::POLE_MASS;
        let pole_mass_length = Self::POLE_MASS * Self::HALF_LENGTH;
        let (sin, cos) = theta.sin_cos();
        let temp = (force + pole_mass_length * theta_dot * theta_dot * sin) / total_mass;
        let theta_acc = (Self::GRAVITY * sin - cos * temp)
            / (Self::HALF_LENGTH * (4.0 / 3.0 - Self::POLE_MASS * cos * cos / total_mass));
        let x_acc = temp - pole_mass_length * theta_acc * cos / total_mass;
        self.state = [
            x + Self::TAU * x_dot,
            x_dot + Self::TAU * x_acc,
            theta + Self::TAU * theta_dot,
            theta_dot + Self::TAU * theta_acc,
        ];
        self.steps += 1;
        self.episode_return += 1.0;
        let fell = self.state[0].abs() > Self::X_LIMIT || self.state[2].abs() > Self::THETA_LIMIT;
        let ended = (fell || self.steps >= Self::MAX_STEPS).then_some(self.episode_return);
        (1.0, ended)
    }
}

/// Shared body, a policy head (2 logits) and a value head.
#[derive(Module, Debug)]
pub struct ActorCritic<B: Backend> {
    body1: Linear<B>,
    body2: Linear<B>,
    policy: Linear<B>,
    value: Linear<B>,
}

impl<B: Backend> ActorCritic<B> {
    pub fn new(device: &B::Device) -> Self {
        Self {
            body1: LinearConfig::new(4, 64).init(device),
            body2: LinearConfig::new(64, 64).init(device),
            policy: LinearConfig::new(64, 2).init(device),
            value: LinearConfig::new(64, 1).init(device),
        }
    }

    /// Action logits `[n, 2]` and state values `[n]` of observations `[n, 4]`.
    pub fn forward(&self, observations: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 1>) {
        let x = tanh(self.body1.forward(observations));
        let x = tanh(self.body2.forward(x));
        let value = self.value.forward(x.clone()).flatten(0, 1);
        (self.policy.forward(x), value)
    }
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Mean return of the episodes that ended in each epoch, over all ranks (NaN if none did).
    pub epoch_returns: Vec<f64>,
    /// Episodes that ended, over all ranks.
    pub episodes: u64,
}

fabric_examples::example_main!(Args, Report);

/// Trains on backend `B`.
pub fn run_on<B: AutodiffBackend + BackendDevices>(args: &Args) -> Result<Report, Box<dyn Error>> {
    let mut fabric = args.fabric.builder::<B>("reinforcement_learning").build()?;
    fabric.print(fabric.describe());
    fabric.seed_everything(args.fabric.seed);
    let model = ActorCritic::new(fabric.device()).fork(fabric.device());
    let report = fabric.launch(|fabric| train_rank(fabric, args, &model))?;
    let first = report.epoch_returns.iter().copied().find(|r| r.is_finite());
    let last = report
        .epoch_returns
        .iter()
        .rev()
        .copied()
        .find(|r| r.is_finite());
    fabric.print(format!(
        "{} episodes; mean return {:.1} in the first epoch, {:.1} in the last (500 at most)",
        report.episodes,
        first.unwrap_or(f64::NAN),
        last.unwrap_or(f64::NAN)
    ));
    Ok(report)
}

/// One rank's transitions of a rollout, time-major (`[step][env]`).
struct Rollout {
    observations: Vec<f32>,
    actions: Vec<i64>,
    rewards: Vec<f64>,
    /// 1 where the episode went on after the step, 0 where it ended.
    continues: Vec<f64>,
}

fn train_rank<B: AutodiffBackend + BackendDevices>(
    fabric: &mut Fabric<B>,
    args: &Args,
    model: &ActorCritic<B>,
) -> Result<Report, FabricError> {
    let device = fabric.device().clone();
    let (mut model, mut optimizer) = fabric.setup(model.clone(), AdamConfig::new().init())?;
    let mut rng = rank_rng(args.fabric.seed, fabric.global_rank());
    let (envs, steps) = (args.envs as usize, args.rollout as usize);
    let mut cartpoles: Vec<CartPole> = (0..envs).map(|_| CartPole::new(&mut rng)).collect();

    let epochs = args.fabric.epochs;
    let progress = progress::bar(fabric, (epochs * args.updates_per_epoch) as u64, "updates");
    let (mut epoch_returns, mut episodes) = (Vec::with_capacity(epochs), 0u64);
    for epoch in 1..=epochs {
        let (mut return_sum, mut ended) = (0.0, 0.0);
        for _ in 0..args.updates_per_epoch {
            // Act with the current policy (no graph), then learn from what happened.
            let policy = model.valid();
            let mut rollout = Rollout {
                observations: Vec::with_capacity(steps * envs * 4),
                actions: Vec::with_capacity(steps * envs),
                rewards: Vec::with_capacity(steps * envs),
                continues: Vec::with_capacity(steps * envs),
            };
            for _ in 0..steps {
                let observations: Vec<f32> =
                    cartpoles.iter().flat_map(|c| c.observation()).collect();
                let (logits, _) = policy.forward(observations_tensor(&observations, envs, &device));
                let probabilities = to_vec(softmax(logits, 1));
                rollout.observations.extend(observations);
                for (env, cartpole) in cartpoles.iter_mut().enumerate() {
                    let action = usize::from(rng.random::<f32>() >= probabilities[2 * env]);
                    let (reward, finished) = cartpole.step(action);
                    rollout.actions.push(action as i64);
                    rollout.rewards.push(reward);
                    rollout
                        .continues
                        .push(if finished.is_some() { 0.0 } else { 1.0 });
                    if let Some(episode_return) = finished {
                        (return_sum, ended) = (return_sum + episode_return, ended + 1.0);
                        *cartpole = CartPole::new(&mut rng);
                    }
                }
            }
            let last: Vec<f32> = cartpoles.iter().flat_map(|c| c.observation()).collect();
            let bootstrap = to_vec(policy.forward(observations_tensor(&last, envs, &device)).1);
            let returns =
                discounted_returns(&rollout.rewards, &rollout.continues, &bootstrap, args.gamma);

            let n = steps * envs;
            // Through the precision context (two outputs, so `autocast` and the casts by
            // hand), so that `--precision *-mixed` applies.
            let observations =
                fabric.cast_input(observations_tensor(&rollout.observations, n, &device));
            let (logits, values) = fabric.autocast(&model, |m| m.forward(observations));
            let (logits, values) = (fabric.cast_output(logits), fabric.cast_output(values));
            let returns = Tensor::<B, 1>::from_data(TensorData::new(returns, [n]), &device);
            let advantages = (returns.clone() - values.clone()).detach();
            let log_probs = log_softmax(logits, 1);
            let actions =
                Tensor::<B, 1, Int>::from_data(TensorData::new(rollout.actions, [n]), &device);
            let taken = log_probs
                .clone()
                .gather(1, actions.reshape([n, 1]))
                .flatten::<1>(0, 1);
            let entropy = (log_probs.clone().exp() * log_probs)
                .sum_dim(1)
                .neg()
                .mean();
            let policy_loss = (taken * advantages).mean().neg();
            let value_loss = (returns - values).powi_scalar(2).mean();
            let loss = policy_loss + value_loss.mul_scalar(0.5) - entropy.mul_scalar(args.entropy);
            fabric.backward(loss, &model)?;
            model = optimizer.step(args.lr, model)?;
            progress.inc(1);
        }
        let return_sum = fabric.all_reduce_scalar(return_sum, ReduceOp::Sum)?;
        let ended = fabric.all_reduce_scalar(ended, ReduceOp::Sum)?;
        episodes += ended as u64;
        let mean_return = if ended > 0.0 {
            return_sum / ended
        } else {
            f64::NAN
        };
        epoch_returns.push(mean_return);
        if mean_return.is_finite() {
            fabric.log("train/episode_return", mean_return, epoch as u64)?;
        }
        progress.suspend(|| {
            fabric.print(format!(
                "epoch {epoch}/{epochs}  {ended:.0} episodes  mean return {mean_return:.1}"
            ))
        });
    }
    progress.finish_and_clear();
    Ok(Report {
        epoch_returns,
        episodes,
    })
}

fn observations_tensor<B: Backend>(values: &[f32], n: usize, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(values.to_vec(), [n, 4]), device)
}

fn to_vec<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    let data = tensor.into_data().convert::<f32>();
    data.to_vec::<f32>().unwrap_or_default()
}

/// The n-step return of every transition (time-major `[step][env]`, one `bootstrap` value per
/// environment): rewards discounted by `gamma` up to the episode's end (`continues` 0) or the
/// rollout's, where the critic's value of the last observation stands in for the rest.
pub fn discounted_returns(
    rewards: &[f64],
    continues: &[f64],
    bootstrap: &[f32],
    gamma: f64,
) -> Vec<f32> {
    let envs = bootstrap.len().max(1);
    let mut running: Vec<f64> = bootstrap.iter().map(|&v| f64::from(v)).collect();
    let mut returns = vec![0.0f32; rewards.len()];
    for index in (0..rewards.len()).rev() {
        let env = index % envs;
        running[env] = rewards[index] + gamma * continues[index] * running[env];
        returns[index] = running[env] as f32;
    }
    returns
}
