//! AMCT's record file (`record.txt`): the factors of every quantized layer in
//! protobuf text format, written and read through `proto/amct.proto`.

use super::amct::{descriptors, proto};
use super::emit::LayerFactors;
use super::tensor_quant::TensorFactors;
use prost_reflect::DynamicMessage;

/// The record of these layers and tensor quantizations (keyed
/// `NODE:INPUT_INDEX`, with `is_tensor_quantize` set, as AMCT writes them).
pub fn to_record(factors: &[LayerFactors], tensors: &[TensorFactors]) -> proto::ScaleOffsetRecord {
    let layers = factors.iter().map(|f| proto::MapFiledEntry {
        key: Some(f.layer.name.clone()),
        value: Some(proto::SingleLayerRecord {
            scale_d: Some(f.act.scale),
            offset_d: Some(f.act.offset),
            scale_w: f.scale_w.clone(),
            offset_w: vec![0; f.scale_w.len()],
            tensor_balance_factor: f.balance.clone().unwrap_or_default(),
            ..Default::default()
        }),
    });
    let tensors = tensors.iter().map(|t| proto::MapFiledEntry {
        key: Some(t.key.clone()),
        value: Some(proto::SingleLayerRecord {
            scale_d: Some(t.act.scale),
            offset_d: Some(t.act.offset),
            is_tensor_quantize: Some(true),
            ..Default::default()
        }),
    });
    proto::ScaleOffsetRecord {
        record: layers.chain(tensors).collect(),
    }
}

/// The record file's text for these layers.
pub fn write_record(factors: &[LayerFactors]) -> String {
    write_record_with_tensors(factors, &[])
}

/// The record file's text for these layers and tensor quantizations.
pub fn write_record_with_tensors(factors: &[LayerFactors], tensors: &[TensorFactors]) -> String {
    write_record_text(&to_record(factors, tensors))
}

/// The text of a record, in AMCT's layout (`record {` blocks, one value
/// per line).
pub fn write_record_text(record: &proto::ScaleOffsetRecord) -> String {
    let desc = descriptors()
        .get_message_by_name("amct.ScaleOffsetRecord")
        .expect("declared in amct.proto");
    let mut msg = DynamicMessage::new(desc);
    msg.transcode_from(record).expect("same schema");
    super::text_format::amct_text(&msg)
}

/// Parses a record file's text.
pub fn read_record(text: &str) -> Result<proto::ScaleOffsetRecord, String> {
    let desc = descriptors()
        .get_message_by_name("amct.ScaleOffsetRecord")
        .expect("declared in amct.proto");
    let msg = DynamicMessage::parse_text_format(desc, text).map_err(|e| e.to_string())?;
    msg.transcode_to().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::text_format::FormatOptions;

    #[test]
    fn reads_amct_example_and_round_trips() {
        let text = "record {\n  key: \"conv1\"\n  value {\n    scale_d: 0.0798481479\n    offset_d: 1\n    scale_w: 0.00297622895\n    offset_w: 0\n  }\n}\n";
        let r = read_record(text).unwrap();
        assert_eq!(r.record[0].key(), "conv1");
        let v = r.record[0].value.as_ref().unwrap();
        assert_eq!(v.scale_d(), 0.079_848_15);
        assert_eq!(v.offset_d(), 1);
        assert_eq!(v.scale_w, vec![0.002_976_229]);
        let desc = descriptors()
            .get_message_by_name("amct.ScaleOffsetRecord")
            .unwrap();
        let mut msg = DynamicMessage::new(desc);
        msg.transcode_from(&r).unwrap();
        let again =
            read_record(&msg.to_text_format_with_options(&FormatOptions::new().pretty(true)))
                .unwrap();
        assert_eq!(again, r);
    }

    /// A record file as AMCT writes it, by hand: our writer gives the same
    /// text, and reading it gives the same factors.
    #[test]
    fn writes_amct_layout() {
        let amct = "record {
  key: \"conv1\"
  value {
    scale_d: 0.0125
    offset_d: -3
    scale_w: 0.002
    scale_w: 4.5e-05
    offset_w: 0
    offset_w: 0
  }
}
record {
  key: \"add1:1\"
  value {
    scale_d: 0.5
    offset_d: 7
    is_tensor_quantize: true
  }
}
";
        let record = proto::ScaleOffsetRecord {
            record: vec![
                proto::MapFiledEntry {
                    key: Some("conv1".into()),
                    value: Some(proto::SingleLayerRecord {
                        scale_d: Some(0.0125),
                        offset_d: Some(-3),
                        scale_w: vec![0.002, 4.5e-5],
                        offset_w: vec![0, 0],
                        ..Default::default()
                    }),
                },
                proto::MapFiledEntry {
                    key: Some("add1:1".into()),
                    value: Some(proto::SingleLayerRecord {
                        scale_d: Some(0.5),
                        offset_d: Some(7),
                        is_tensor_quantize: Some(true),
                        ..Default::default()
                    }),
                },
            ],
        };
        assert_eq!(write_record_text(&record), amct);
        assert_eq!(read_record(amct).unwrap(), record);
    }

    #[test]
    fn malformed_records_are_errors() {
        assert!(read_record("record { key: 3 }").is_err());
        assert!(read_record("records { }").is_err());
    }
}
