//! Burn records as checkpoint entry bytes: Burn's named MessagePack recorder, so `ParamId`s
//! survive and optimizer state still matches its parameters. Every map is written with its keys
//! in sorted order (Burn's optimizer records are hash maps, whose order is left to chance), so
//! the same record always encodes to the same bytes.

use super::Settings;
use burn::record::{
    DoublePrecisionSettings, FullPrecisionSettings, NamedMpkBytesRecorder, Record, Recorder,
};
use burn::tensor::backend::Backend;
use rmpv::Value;

/// Encodes `record` with `settings`' float precision.
pub fn encode_record<B: Backend, R: Record<B>>(
    record: R,
    settings: Settings,
) -> Result<Vec<u8>, String> {
    let bytes = match settings {
        Settings::Full => Recorder::<B>::record(
            &NamedMpkBytesRecorder::<FullPrecisionSettings>::default(),
            record,
            (),
        ),
        Settings::Double => Recorder::<B>::record(
            &NamedMpkBytesRecorder::<DoublePrecisionSettings>::default(),
            record,
            (),
        ),
    };
    let bytes = bytes.map_err(|e| format!("cannot encode the record: {e}"))?;
    write_value(&sorted(read_value(&bytes)?))
}

/// Decodes a record written by [`encode_record`] with the same `settings`, onto `device`.
pub fn decode_record<B: Backend, R: Record<B>>(
    bytes: &[u8],
    settings: Settings,
    device: &B::Device,
) -> Result<R, String> {
    let record = match settings {
        Settings::Full => Recorder::<B>::load(
            &NamedMpkBytesRecorder::<FullPrecisionSettings>::default(),
            bytes.to_vec(),
            device,
        ),
        Settings::Double => Recorder::<B>::load(
            &NamedMpkBytesRecorder::<DoublePrecisionSettings>::default(),
            bytes.to_vec(),
            device,
        ),
    };
    record.map_err(|e| format!("the record does not fit this object: {e}"))
}

/// The MessagePack value encoded in `bytes`.
pub(crate) fn read_value(bytes: &[u8]) -> Result<Value, String> {
    rmpv::decode::read_value(&mut &bytes[..]).map_err(|e| format!("not a MessagePack record: {e}"))
}

/// `value` encoded as MessagePack.
pub(crate) fn write_value(value: &Value) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).map_err(|e| format!("cannot encode: {e}"))?;
    Ok(out)
}

/// `value` with every map's entries in the order of their keys' encodings.
fn sorted(value: Value) -> Value {
    match value {
        Value::Map(entries) => {
            let mut entries: Vec<(Vec<u8>, Value, Value)> = entries
                .into_iter()
                .map(|(k, v)| {
                    let k = sorted(k);
                    (write_value(&k).unwrap_or_default(), k, sorted(v))
                })
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Map(entries.into_iter().map(|(_, k, v)| (k, v)).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_come_out_sorted_at_every_level_and_nothing_else_changes() {
        let map = |pairs: Vec<(&str, Value)>| {
            Value::Map(
                pairs
                    .into_iter()
                    .map(|(k, v)| (Value::from(k), v))
                    .collect(),
            )
        };
        let shuffled = map(vec![
            ("b", Value::from(2)),
            (
                "a",
                map(vec![
                    ("z", Value::from(1.5f32)),
                    ("y", Value::Binary(vec![1, 2])),
                ]),
            ),
        ]);
        let ordered = map(vec![
            (
                "a",
                map(vec![
                    ("y", Value::Binary(vec![1, 2])),
                    ("z", Value::from(1.5f32)),
                ]),
            ),
            ("b", Value::from(2)),
        ]);
        assert_eq!(sorted(shuffled.clone()), ordered);
        let bytes = write_value(&shuffled).unwrap();
        assert_eq!(
            read_value(&write_value(&sorted(read_value(&bytes).unwrap())).unwrap()).unwrap(),
            ordered
        );
    }
}
