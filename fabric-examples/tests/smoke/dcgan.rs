//! Smoke test of the DCGAN example: a few epochs on two ranks write one readable PNG grid per
//! epoch, the discriminator learns to tell real from generated digits, and the generator's mean
//! digit moves towards the data's.

#[path = "../../examples/dcgan.rs"]
#[allow(dead_code)]
mod example;

use clap::Parser;
use example::Args;

/// The example's `run`, alone in this binary (see [`crate::exclusive`]).
fn run(args: &Args) -> Result<example::Report, Box<dyn std::error::Error>> {
    crate::exclusive(|| example::run(args))
}

#[test]
fn three_epochs_on_two_ranks_write_grids_and_learn() {
    let dir = std::env::temp_dir().join(format!("fabric-dcgan-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_string_lossy().into_owned();
    let args = Args::parse_from([
        "dcgan",
        "--devices",
        "2",
        "--epochs",
        "3",
        "--out-dir",
        &out,
    ]);
    let report = run(&args).unwrap();

    assert_eq!(report.grids.len(), 3);
    for grid in &report.grids {
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(grid).unwrap()));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert_eq!((info.width, info.height), (288, 288), "{}", grid.display());
        assert_eq!(info.color_type, png::ColorType::Grayscale);
    }
    for value in [report.discriminator_loss, report.generator_loss] {
        assert!(value.is_finite() && value > 0.0, "{report:?}");
    }
    assert!(report.real_score > report.fake_score, "{report:?}");
    let distances = &report.mean_digit_distance;
    assert_eq!(distances.len(), 4);
    assert!(distances[3] < distances[0], "{distances:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
