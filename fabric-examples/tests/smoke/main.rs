//! Smoke tests of every example (a few steps each), in one test binary so the examples build
//! and link once.

mod dcgan;
mod fsdp_memory;
mod image_classifier;
mod kfold_cv;
mod language_model;
mod meta_learning;
mod reinforcement_learning;
mod trainer;

/// Burn's RNG is one per process, and an example seeds it and draws its model and data from it:
/// two examples running at once would draw from each other's sequence, and runs that must
/// agree (every strategy on the same model, a resumed run against an uninterrupted one) would
/// not. Every example of this binary runs through here, one at a time.
fn exclusive<T>(run: impl FnOnce() -> T) -> T {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _alone = RNG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    run()
}
