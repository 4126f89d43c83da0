//! Smoke test of the reinforcement-learning example: the physics match Gym's CartPole-v1, the
//! returns are discounted correctly, and a short A2C run on two ranks raises the mean return.

#[path = "../../examples/reinforcement_learning.rs"]
#[allow(dead_code)]
mod example;

use clap::Parser;
use example::{Args, CartPole, discounted_returns};

/// The example's `run`, alone in this binary (see [`crate::exclusive`]).
fn run(args: &Args) -> Result<example::Report, Box<dyn std::error::Error>> {
    crate::exclusive(|| example::run(args))
}

#[test]
fn one_push_from_rest_matches_gym() {
    // Gym's CartPole-v1 from the zero state, action 1: [0, 0.19512195, 0, -0.29268293].
    let mut cartpole = CartPole::from_state([0.0; 4]);
    assert_eq!(cartpole.step(1), (1.0, None));
    let expected = [0.0, 0.195_121_95, 0.0, -0.292_682_93];
    for (got, want) in cartpole.observation().iter().zip(expected) {
        assert!((got - want).abs() < 1e-6, "{:?}", cartpole.observation());
    }
}

#[test]
fn pushing_one_way_ends_the_episode_soon_and_balancing_is_cut_at_500() {
    let mut cartpole = CartPole::from_state([0.0, 0.0, 0.01, 0.0]);
    let ended = (1..=100).find_map(|step| cartpole.step(1).1.map(|r| (step, r)));
    let (step, episode_return) = ended.expect("the pole falls");
    assert!(
        step < 30 && episode_return == step as f64,
        "{step} {episode_return}"
    );
    // A controller that pushes towards the lean (position and velocity terms keep the cart in
    // bounds) balances it: the episode is cut at 500 steps.
    let mut balanced = CartPole::from_state([0.0, 0.0, 0.01, 0.0]);
    let cut = (1..=600).find_map(|step| {
        let [x, x_dot, theta, theta_dot] = balanced.observation();
        let push_right = 0.1 * x + 0.5 * x_dot + 10.0 * theta + 2.0 * theta_dot > 0.0;
        balanced.step(usize::from(push_right)).1.map(|_| step)
    });
    assert_eq!(cut, Some(CartPole::MAX_STEPS));
}

#[test]
fn returns_discount_within_episodes_and_bootstrap_at_the_rollout_end() {
    // Two environments, three steps, time-major; env 1's episode ends at step 1.
    let rewards = [1.0; 6];
    let continues = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0];
    let returns = discounted_returns(&rewards, &continues, &[10.0, 20.0], 0.5);
    // env 0: 1 + .5·10 = 6, 1 + .5·6 = 4, 1 + .5·4 = 3.
    // env 1: 1 + .5·20 = 11; the episode ends at step 1 (return 1); 1 + .5·1 = 1.5.
    assert_eq!(returns, vec![3.0, 1.5, 4.0, 1.0, 6.0, 11.0]);
}

#[test]
fn a2c_on_two_ranks_raises_the_mean_return() {
    let args = Args::parse_from(["reinforcement_learning", "--devices", "2", "--epochs", "6"]);
    let report = run(&args).unwrap();
    let returns = &report.epoch_returns;
    assert_eq!(returns.len(), 6);
    assert!(returns.iter().all(|r| r.is_finite()), "{returns:?}");
    assert!(returns[5] > 2.0 * returns[0], "{returns:?}");
    assert!(report.episodes > 0);
}
