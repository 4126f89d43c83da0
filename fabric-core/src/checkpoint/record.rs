//! Burn records as checkpoint entry bytes: Burn's named MessagePack recorder, so `ParamId`s
//! survive and optimizer state still matches its parameters.

use super::Settings;
use burn::record::{
    DoublePrecisionSettings, FullPrecisionSettings, NamedMpkBytesRecorder, Record, Recorder,
};
use burn::tensor::backend::Backend;

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
    bytes.map_err(|e| format!("cannot encode the record: {e}"))
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
