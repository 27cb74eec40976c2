use safeguard_gguf::{GgmlType, GgufError, GgufFile, GgufWriter, MetaArray, MetaValue, TensorSpec};

fn sample(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("sample.gguf");
    let metadata: Vec<(String, MetaValue)> = vec![
        ("general.architecture".into(), "gpt-oss".into()),
        ("u8".into(), MetaValue::U8(7)),
        ("i8".into(), MetaValue::I8(-7)),
        ("u16".into(), MetaValue::U16(65535)),
        ("i16".into(), MetaValue::I16(-300)),
        ("u32".into(), MetaValue::U32(4_000_000_000)),
        ("i32".into(), MetaValue::I32(-5)),
        ("f32".into(), MetaValue::F32(1.5)),
        ("bool".into(), MetaValue::Bool(true)),
        ("string".into(), "héllo".into()),
        ("u64".into(), MetaValue::U64(1 << 40)),
        ("i64".into(), MetaValue::I64(-(1 << 40))),
        ("f64".into(), MetaValue::F64(0.1)),
        ("strings".into(), MetaArray::String(vec!["a".into(), "".into(), "ü b".into()]).into()),
        ("ints".into(), MetaArray::I32(vec![1, -2, 3]).into()),
        ("nested".into(), MetaArray::Array(vec![MetaArray::U8(vec![1, 2]), MetaArray::F32(vec![0.5])]).into()),
    ];
    let tensors = vec![
        TensorSpec::new("a", &[3], GgmlType::F32),
        TensorSpec::new("b", &[32, 2], GgmlType::Q8_0),
        TensorSpec::new("c", &[64], GgmlType::Mxfp4),
        TensorSpec::new("d", &[5], GgmlType::F16),
    ];
    let mut w = GgufWriter::create(&path, &metadata, tensors).unwrap();
    w.write_tensor_f32("a", &[1.0, 2.0, 3.0]).unwrap();
    let b: Vec<f32> = (0..64).map(|i| i as f32 - 32.0).collect();
    // chunked write: one block at a time
    w.write_tensor_f32("b", &b[..32]).unwrap();
    w.write_tensor_f32("b", &b[32..]).unwrap();
    w.write_tensor_f32("c", &[0.5; 64]).unwrap();
    w.write_tensor_f32("d", &[1.0, -1.0, 0.5, 2.0, 4.0]).unwrap();
    w.finish().unwrap();
    path
}

#[test]
fn every_metadata_type_and_tensor_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample(dir.path());
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.metadata().len(), 16);
    assert_eq!(f.get("u8"), Some(&MetaValue::U8(7)));
    assert_eq!(f.get("i16"), Some(&MetaValue::I16(-300)));
    assert_eq!(f.get_u32("u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get("i64"), Some(&MetaValue::I64(-(1 << 40))));
    assert_eq!(f.get("f64"), Some(&MetaValue::F64(0.1)));
    assert_eq!(f.get_str("string").unwrap(), "héllo");
    assert_eq!(f.get("bool"), Some(&MetaValue::Bool(true)));
    assert_eq!(f.get("strings"), Some(&MetaValue::Array(MetaArray::String(vec!["a".into(), "".into(), "ü b".into()]))));
    assert_eq!(
        f.get("nested"),
        Some(&MetaValue::Array(MetaArray::Array(vec![MetaArray::U8(vec![1, 2]), MetaArray::F32(vec![0.5])])))
    );
    assert_eq!(f.tensor_f32("a").unwrap(), vec![1.0, 2.0, 3.0]);
    let b = f.tensor_f32("b").unwrap();
    assert!((b[0] + 32.0).abs() < 0.01, "{}", b[0]);
    assert!((b[63] - 31.0).abs() < 0.2);
    assert_eq!(f.tensor_f32("c").unwrap(), vec![0.5; 64]);
    assert_eq!(f.tensor_f32("d").unwrap(), vec![1.0, -1.0, 0.5, 2.0, 4.0]);
    for t in f.tensors() {
        assert_eq!((f.data_offset + t.offset) % 32, 0, "{} is aligned", t.name);
    }
    assert_eq!(f.tensor("b").unwrap().shape, vec![32, 2]);
    f.expect_architecture("gpt-oss").unwrap();
    match f.expect_architecture("llama") {
        Err(GgufError::WrongArchitecture { expected, found }) => {
            assert_eq!((expected.as_str(), found.as_str()), ("llama", "gpt-oss"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn writer_refuses_wrong_order_sizes_and_unfinished_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.gguf");
    let tensors = vec![TensorSpec::new("x", &[2], GgmlType::F32), TensorSpec::new("y", &[2], GgmlType::F32)];
    let mut w = GgufWriter::create(&path, &[], tensors.clone()).unwrap();
    assert!(w.write_tensor_f32("y", &[1.0, 2.0]).is_err());
    assert!(w.write_tensor_f32("x", &[1.0, 2.0, 3.0]).is_err());
    w.write_tensor_f32("x", &[1.0, 2.0]).unwrap();
    assert!(w.finish().is_err());
    assert!(!path.exists(), "an unfinished write leaves no model file");
    assert!(!dir.path().join("w.gguf.partial").exists(), "and no partial file");
    assert!(GgufWriter::create(&path, &[], vec![TensorSpec::new("q", &[31], GgmlType::Q8_0)]).is_err());
    let dup = vec![TensorSpec::new("x", &[2], GgmlType::F32), TensorSpec::new("x", &[2], GgmlType::F32)];
    assert!(GgufWriter::create(&path, &[], dup).is_err());
}

#[test]
fn damaged_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(sample(dir.path())).unwrap();

    let mut bad_magic = good.clone();
    bad_magic[..4].copy_from_slice(b"GGML");
    let err = GgufFile::from_bytes(bad_magic).err().unwrap();
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
    assert!(err.to_string().contains("not a GGUF file"));

    let mut v4 = good.clone();
    v4[4..8].copy_from_slice(&4u32.to_le_bytes());
    assert!(matches!(GgufFile::from_bytes(v4), Err(GgufError::UnsupportedVersion(4))));

    // Cut inside the header, the metadata, the tensor infos, and the last tensor's data (the final
    // 32 bytes are tensor d's 10 bytes plus padding).
    for cut in [3usize, 20, 200, 700, good.len() - 25] {
        let err = GgufFile::from_bytes(good[..cut].to_vec()).err().unwrap_or_else(|| panic!("cut at {cut} accepted"));
        assert!(
            matches!(err, GgufError::Truncated { .. } | GgufError::TensorOutOfBounds { .. }),
            "cut at {cut}: {err}"
        );
    }

    // A huge array count must fail fast, not allocate.
    let mut huge = Vec::new();
    huge.extend_from_slice(b"GGUF");
    huge.extend_from_slice(&3u32.to_le_bytes());
    huge.extend_from_slice(&0u64.to_le_bytes());
    huge.extend_from_slice(&1u64.to_le_bytes());
    huge.extend_from_slice(&1u64.to_le_bytes());
    huge.extend_from_slice(b"k");
    huge.extend_from_slice(&9u32.to_le_bytes());
    huge.extend_from_slice(&8u32.to_le_bytes());
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(GgufFile::from_bytes(huge), Err(GgufError::Truncated { .. })));

    // A tensor whose element count fits in 64 bits but whose byte size does not is refused, not wrapped to a
    // few bytes.
    let mut wrapped = Vec::new();
    wrapped.extend_from_slice(b"GGUF");
    wrapped.extend_from_slice(&3u32.to_le_bytes());
    wrapped.extend_from_slice(&1u64.to_le_bytes());
    wrapped.extend_from_slice(&0u64.to_le_bytes());
    wrapped.extend_from_slice(&1u64.to_le_bytes());
    wrapped.extend_from_slice(b"t");
    wrapped.extend_from_slice(&1u32.to_le_bytes());
    wrapped.extend_from_slice(&((1u64 << 62) + 1).to_le_bytes());
    wrapped.extend_from_slice(&0u32.to_le_bytes());
    wrapped.extend_from_slice(&0u64.to_le_bytes());
    wrapped.resize(wrapped.len().next_multiple_of(32) + 32, 0);
    let err = GgufFile::from_bytes(wrapped).err().expect("a 2^62-element f32 tensor in 32 bytes was accepted");
    assert!(err.to_string().contains("byte size overflows"), "{err}");

    let err = GgufFile::open(&dir.path().join("missing.gguf")).err().unwrap();
    assert!(err.to_string().contains("missing.gguf"), "{err}");
}
