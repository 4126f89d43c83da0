//! Logging from global rank 0 only, and callbacks reached in order on every rank.

use burn_fabric::{
    Callback, CsvLogger, EnvVars, Fabric, FabricError, TensorBoardLogger, TrainBatchEnd,
};
use std::sync::{Arc, Mutex};

type B = burn::backend::Autodiff<burn::backend::Flex>;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fabric-log-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn only_global_rank_zero_writes_and_steps_count_up() {
    let root = temp_dir("csv");
    let mut fabric = Fabric::<B>::builder()
        .devices(2)
        .env(EnvVars::default())
        .logger(CsvLogger::new(&root, "run"))
        .logger(TensorBoardLogger::new(&root, "tb"))
        .build()
        .unwrap();
    fabric
        .launch(|fabric| {
            for i in 0..3 {
                fabric.log("loss", 1.0 / (i + 1) as f64, None)?;
            }
            fabric.log_dict([("acc", 0.5), ("loss", 0.1)], 10)?;
            fabric.barrier()
        })
        .unwrap();
    fabric.finalize_loggers().unwrap();
    assert_eq!(fabric.log_dir(), Some(root.join("run/version_0")));
    let csv = std::fs::read_to_string(root.join("run/version_0/metrics.csv")).unwrap();
    assert_eq!(
        csv,
        "acc,loss,step\n,1,0\n,0.5,1\n,0.3333333333333333,2\n0.5,0.1,10\n"
    );
    // one version per logger: rank 1 created nothing
    assert_eq!(std::fs::read_dir(root.join("run")).unwrap().count(), 1);
    let events: Vec<_> = std::fs::read_dir(root.join("tb/version_0"))
        .unwrap()
        .collect();
    assert_eq!(events.len(), 1);
    let _ = std::fs::remove_dir_all(&root);
}

/// Records every hook it sees, tagged with its name.
struct Recorder {
    name: &'static str,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Callback for Recorder {
    fn on_after_setup(&mut self) {
        self.seen
            .lock()
            .unwrap()
            .push(format!("{} setup", self.name));
    }
    fn on_train_batch_end(&mut self, event: &TrainBatchEnd) {
        self.seen.lock().unwrap().push(format!(
            "{} batch {} rank {}",
            self.name, event.batch, event.rank
        ));
    }
    fn on_hook(&mut self, name: &str, args: &serde_json::Value) {
        self.seen
            .lock()
            .unwrap()
            .push(format!("{} {name} {args}", self.name));
    }
}

#[test]
fn callbacks_are_reached_in_order_on_every_rank() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let shared = Arc::clone(&seen);
    let mut fabric = Fabric::<B>::builder()
        .devices(2)
        .env(EnvVars::default())
        .callbacks(move || {
            vec![
                Box::new(Recorder {
                    name: "first",
                    seen: Arc::clone(&shared),
                }) as Box<dyn Callback>,
                Box::new(Recorder {
                    name: "second",
                    seen: Arc::clone(&shared),
                }),
            ]
        })
        .build()
        .unwrap();
    fabric
        .launch(|fabric| {
            let device = *fabric.device();
            fabric.setup_module(burn::nn::LinearConfig::new(2, 2).init::<B>(&device))?;
            fabric.barrier()?;
            if fabric.global_rank() == 1 {
                let event = TrainBatchEnd {
                    rank: 1,
                    epoch: 0,
                    batch: 4,
                    global_step: 4,
                    loss: 0.1,
                };
                fabric.call(|c| c.on_train_batch_end(&event));
                fabric.call_hook("on_checkpoint", &serde_json::json!({"step": 4}));
            }
            Ok::<_, FabricError>(())
        })
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().filter(|s| s.ends_with("setup")).count(),
        4,
        "{seen:?}"
    );
    let rank1: Vec<&String> = seen.iter().filter(|s| !s.ends_with("setup")).collect();
    assert_eq!(
        rank1,
        vec![
            "first batch 4 rank 1",
            "second batch 4 rank 1",
            "first on_checkpoint {\"step\":4}",
            "second on_checkpoint {\"step\":4}"
        ]
    );
}
