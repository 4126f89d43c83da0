//! Configuration from typed values and Lightning's strings: what is accepted, what is refused,
//! and that every refusal names the bad value and the valid ones.

use burn_fabric::{Accelerator, Devices, EnvVars, Fabric, FabricError, Precision, StrategyChoice};

type B = burn::backend::Autodiff<burn::backend::Flex>;

fn build(
    f: impl FnOnce(burn_fabric::FabricBuilder<B>) -> burn_fabric::FabricBuilder<B>,
) -> Result<Fabric<B>, FabricError> {
    f(Fabric::<B>::builder().env(EnvVars::default())).build()
}

fn err(f: impl FnOnce(burn_fabric::FabricBuilder<B>) -> burn_fabric::FabricBuilder<B>) -> String {
    match build(f) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_resolve_to_one_cpu_rank() {
    let fabric = build(|b| b).unwrap();
    assert_eq!(fabric.world_size(), 1);
    assert_eq!(fabric.accelerator(), Accelerator::Cpu);
    assert_eq!(fabric.strategy(), StrategyChoice::SingleDevice);
    assert_eq!(fabric.precision(), Precision::Full);
    assert_eq!(
        fabric.describe(),
        "backend=flex accelerator=cpu devices=1 num_nodes=1 world_size=1 strategy=single_device precision=32-true"
    );
}

#[test]
fn strings_and_typed_values_are_equivalent() {
    let a = build(|b| {
        b.accelerator("CPU")
            .devices("3")
            .strategy("DDP")
            .precision("32")
    })
    .unwrap();
    let b = build(|b| {
        b.accelerator(Accelerator::Cpu)
            .devices(3)
            .strategy(StrategyChoice::Ddp)
            .precision(32)
    })
    .unwrap();
    assert_eq!(a.describe(), b.describe());
    assert_eq!(a.world_size(), 3);
    assert_eq!(a.strategy(), StrategyChoice::Ddp);
    // Lightning's DDP aliases and `auto`
    for name in [
        "ddp_spawn",
        "ddp_fork",
        "ddp_notebook",
        "ddp_find_unused_parameters_true",
        "dp",
    ] {
        assert_eq!(
            build(|b| b.devices(2).strategy(name)).unwrap().strategy(),
            StrategyChoice::Ddp
        );
    }
    assert_eq!(build(|b| b.devices("auto")).unwrap().world_size(), 1);
    assert_eq!(
        build(|b| b.devices(2).strategy("auto")).unwrap().strategy(),
        StrategyChoice::Ddp
    );
    assert_eq!(
        build(|b| b.devices(1).strategy("ddp")).unwrap().strategy(),
        StrategyChoice::Ddp
    );
}

#[test]
fn every_lightning_precision_string_parses() {
    let all = [
        ("64-true", Precision::Double),
        ("64", Precision::Double),
        ("32-true", Precision::Full),
        ("32", Precision::Full),
        ("16-true", Precision::HalfTrue),
        ("bf16-true", Precision::Bf16True),
        ("16-mixed", Precision::HalfMixed),
        ("16", Precision::HalfMixed),
        ("bf16-mixed", Precision::Bf16Mixed),
        ("bf16", Precision::Bf16Mixed),
        ("transformer-engine", Precision::TransformerEngine),
        (
            "transformer-engine-float16",
            Precision::TransformerEngineFloat16,
        ),
    ];
    for (text, precision) in all {
        assert_eq!(text.parse::<Precision>().unwrap(), precision, "{text}");
    }
    // Flex runs every precision Burn has; Transformer Engine is refused naming it and the others.
    for (text, precision) in all {
        match precision {
            Precision::TransformerEngine | Precision::TransformerEngineFloat16 => {
                let message = err(|b| b.precision(text));
                assert!(
                    message.contains(precision.as_str()) && message.contains("bf16-mixed"),
                    "{message}"
                );
            }
            _ => assert_eq!(build(|b| b.precision(text)).unwrap().precision(), precision),
        }
    }
}

#[test]
fn device_forms_parse() {
    assert_eq!("auto".parse::<Devices>().unwrap(), Devices::Auto);
    assert_eq!("-1".parse::<Devices>().unwrap(), Devices::All);
    assert_eq!("3".parse::<Devices>().unwrap(), Devices::Count(3));
    assert_eq!("0,2".parse::<Devices>().unwrap(), Devices::Ids(vec![0, 2]));
    assert_eq!("1, 3".parse::<Devices>().unwrap(), Devices::Ids(vec![1, 3]));
    assert_eq!("2,".parse::<Devices>().unwrap(), Devices::Ids(vec![2]));
}

#[test]
fn invalid_values_name_the_value_and_the_valid_ones() {
    let cases: Vec<(String, &[&str])> = vec![
        (
            err(|b| b.accelerator("tpu")),
            &["tpu", "cpu", "cuda", "wgpu", "auto"],
        ),
        (
            err(|b| b.strategy("deepspeed")),
            &["deepspeed", "ddp", "fsdp", "single_device"],
        ),
        (
            err(|b| b.strategy("bogus")),
            &["bogus", "ddp", "single_device", "auto"],
        ),
        (
            err(|b| b.precision("8-true")),
            &["8-true", "32-true", "bf16-mixed"],
        ),
        (err(|b| b.precision(8)), &["`8`", "32-true"]),
        (err(|b| b.devices(0)), &["`0`", "positive count"]),
        (err(|b| b.devices("two")), &["two", "positive count"]),
        (err(|b| b.devices(-3)), &["-3", "positive count"]),
        (
            err(|b| b.num_nodes(0)),
            &["num_nodes", "`0`", "positive integer"],
        ),
        (err(|b| b.devices(-1)), &["-1", "positive count"]),
        (err(|b| b.devices("0,2")), &["0,2", "positive count"]),
        (err(|b| b.accelerator("gpu")), &["gpu", "flex", "`cpu`"]),
        (err(|b| b.accelerator("cuda")), &["cuda", "flex", "`cpu`"]),
        (
            err(|b| b.devices(2).strategy("single_device")),
            &["single_device", "ddp"],
        ),
        (err(|b| b.num_nodes(2)), &["num_nodes=2", "mpi"]),
        (err(|b| b.bucket_bytes(0)), &["bucket_bytes", "0"]),
        (
            err(|b| b.collective_timeout(std::time::Duration::ZERO)),
            &["collective_timeout"],
        ),
    ];
    for (message, needles) in cases {
        for needle in needles {
            assert!(
                message.contains(needle),
                "`{message}` should mention `{needle}`"
            );
        }
    }
}

#[test]
fn environment_values_apply_and_conflicts_are_errors() {
    let env = |pairs: &[(&str, &str)]| EnvVars::from_pairs(pairs.iter().map(|(k, v)| (*k, *v)));
    // The CLI's values apply when the code says nothing.
    let f = Fabric::<B>::builder()
        .env(env(&[
            ("LT_CLI_USED", "1"),
            ("LT_DEVICES", "2"),
            ("LT_STRATEGY", "ddp"),
            ("LT_PRECISION", "32-true"),
        ]))
        .build()
        .unwrap();
    assert_eq!((f.world_size(), f.strategy()), (2, StrategyChoice::Ddp));
    // A default value in code does not conflict, nor does an equal one.
    let f = Fabric::<B>::builder()
        .devices(2)
        .precision("32-true")
        .env(env(&[
            ("LT_CLI_USED", "1"),
            ("LT_DEVICES", "2"),
            ("LT_PRECISION", "32"),
        ]))
        .build()
        .unwrap();
    assert_eq!(f.world_size(), 2);
    // A different non-default value in code is an error naming both.
    let message = Fabric::<B>::builder()
        .devices(4)
        .env(env(&[("LT_CLI_USED", "1"), ("LT_DEVICES", "2")]))
        .build()
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains("devices")
            && message.contains('4')
            && message.contains("LT_DEVICES")
            && message.contains('2'),
        "{message}"
    );
    // Without the CLI marker the environment wins silently (Lightning's rule).
    let f = Fabric::<B>::builder()
        .devices(4)
        .env(env(&[("LT_DEVICES", "2")]))
        .build()
        .unwrap();
    assert_eq!(f.world_size(), 2);
    // A bad environment value is reported like a bad code value.
    let message = Fabric::<B>::builder()
        .env(env(&[("LT_ACCELERATOR", "quantum")]))
        .build()
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains("quantum") && message.contains("cpu"),
        "{message}"
    );
}

#[test]
fn rank_operations_before_launch_are_refused() {
    let mut fabric = build(|b| b.devices(2)).unwrap();
    let model = burn::nn::LinearConfig::new(2, 2).init::<B>(&Default::default());
    let err = fabric.setup_module(model).unwrap_err();
    assert!(
        matches!(
            err,
            FabricError::NotLaunched {
                operation: "setup_module",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("launch"));
}
