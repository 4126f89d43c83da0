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
