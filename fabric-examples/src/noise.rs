//! Seeded random numbers for the examples that draw their own (latent noise, actions): one
//! stream per rank, reproducible from `--seed`, independent of the backend's generator.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// A generator for `rank` derived from `seed`; ranks get different, reproducible streams.
pub fn rank_rng(seed: u64, rank: usize) -> StdRng {
    StdRng::seed_from_u64(
        seed ^ (rank as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
    )
}

/// `n` draws from the standard normal distribution (Box–Muller).
pub fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        out.push((radius * angle.cos()) as f32);
        out.push((radius * angle.sin()) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_draws_have_unit_moments_and_ranks_differ() {
        let draws = normal(&mut rank_rng(7, 0), 100_000);
        let mean = draws.iter().map(|&x| x as f64).sum::<f64>() / draws.len() as f64;
        let var = draws
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / draws.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
        assert_ne!(
            normal(&mut rank_rng(7, 0), 4),
            normal(&mut rank_rng(7, 1), 4)
        );
        assert_eq!(
            normal(&mut rank_rng(7, 1), 4),
            normal(&mut rank_rng(7, 1), 4)
        );
    }
}
