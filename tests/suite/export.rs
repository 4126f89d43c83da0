//! Safetensors export in PyTorch's layout, read back with the `safetensors` crate.

use crate::common;

use burn_fabric::export_safetensors;
use common::{B, D_HIDDEN, D_IN, Mlp};

#[test]
fn weights_export_with_pytorch_names_and_layout() {
    let dir = std::env::temp_dir().join(format!("fabric-export-{}", std::process::id()));
    let path = dir.join("model.safetensors");
    let model = Mlp::<B>::deterministic(&Default::default());
    export_safetensors(&model, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = file.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(names, vec!["l1.bias", "l1.weight", "l2.bias", "l2.weight"]);
    let weight = file.tensor("l1.weight").unwrap();
    assert_eq!(weight.dtype(), safetensors::Dtype::F32);
    // Burn stores Linear weights [in, out]; PyTorch [out, in]
    assert_eq!(weight.shape(), &[D_HIDDEN, D_IN]);
    let exported: Vec<f32> = weight
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let burn: Vec<f32> = model.l1.weight.val().into_data().to_vec().unwrap();
    for i in 0..D_IN {
        for o in 0..D_HIDDEN {
            assert_eq!(exported[o * D_IN + i], burn[i * D_HIDDEN + o]);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two exports of the same weights are the same bytes (safetensors' metadata map would otherwise
/// come out in a random order), and the file still reads back with its metadata.
#[test]
fn identical_weights_export_to_identical_bytes() {
    let dir = std::env::temp_dir().join(format!("fabric-export-bytes-{}", std::process::id()));
    let model = Mlp::<B>::deterministic(&Default::default());
    let exports: Vec<Vec<u8>> = (0..8)
        .map(|i| {
            let path = dir.join(format!("model-{i}.safetensors"));
            export_safetensors(&model, &path).unwrap();
            std::fs::read(&path).unwrap()
        })
        .collect();
    for (i, bytes) in exports.iter().enumerate() {
        assert!(bytes == &exports[0], "export {i} differs from export 0");
    }
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&exports[0]).unwrap();
    let meta = metadata.metadata().clone().unwrap();
    assert_eq!(
        meta.get("producer").map(String::as_str),
        Some("burn-fabric")
    );
    assert!(meta.contains_key("format") && meta.contains_key("version"));
    let file = safetensors::SafeTensors::deserialize(&exports[0]).unwrap();
    assert_eq!(file.names().len(), 4);
    let _ = std::fs::remove_dir_all(&dir);
}
