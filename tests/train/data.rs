//! Data sets and augmentation: each loader on small files generated here (IDX raw and gzipped,
//! CIFAR-10/100 binaries, an ImageFolder tree of PNG and JPEG files), their errors on
//! malformed files, and what the transforms do (shapes, seeded determinism, crops, flips,
//! resizing, normalisation), alone and through the prefetching loader.

use flate2::write::GzEncoder;
use senet::train::augment::{Augment, CropParams};
use senet::train::data::{cifar, folder, idx, DataKind, DataSpec, Dataset, Image, InMemory};
use senet::train::loader::{epoch_order, make_batch, Loader, Sampling};
use senet::{rng, Error};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

fn random_image(c: usize, h: usize, w: usize, seed: u64) -> Image {
    let data = rng::uniform_vec(c * h * w, 0.0, 256.0, seed)
        .into_iter()
        .map(|v| v as u8)
        .collect();
    Image::new(c, h, w, data).unwrap()
}

/// Normalisation that leaves pixel values as they are (mean 0, std 1/255).
fn identity_aug(c: usize, crop: usize, scale: (usize, usize), eval: usize) -> Augment {
    Augment {
        scale_min: scale.0,
        scale_max: scale.1,
        crop,
        hflip: false,
        vflip: false,
        eval_resize: eval,
        mean: vec![0.0; c],
        std: vec![1.0 / 255.0; c],
    }
}

fn render(a: &Augment, img: &Image, p: CropParams) -> Vec<f32> {
    let mut out = vec![0.0; a.sample_len(img.channels)];
    a.render(img, &p, &mut out).unwrap();
    out
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() < 1e-3
}

#[test]
fn crops_take_the_window_they_name() {
    let img = random_image(2, 9, 11, 1);
    // Shorter side 9 resized to 9: no resampling, so a crop is a window of pixels.
    let a = identity_aug(2, 5, (9, 9), 9);
    for (oy, ox) in [(0, 0), (4, 6), (2, 3)] {
        let p = CropParams {
            scaled: (9, 11),
            offset: (oy, ox),
            hflip: false,
            vflip: false,
        };
        let out = render(&a, &img, p);
        for c in 0..2 {
            for y in 0..5 {
                for x in 0..5 {
                    let got = out[(c * 5 + y) * 5 + x];
                    let want = img.at(c, oy + y, ox + x) as f32;
                    assert!(
                        close(got, want),
                        "({c},{y},{x}) at {oy},{ox}: {got} vs {want}"
                    );
                }
            }
        }
    }
    // A window past the edge is an error, not a panic.
    let p = CropParams {
        scaled: (9, 11),
        offset: (5, 0),
        hflip: false,
        vflip: false,
    };
    let mut out = vec![0.0; a.sample_len(2)];
    assert!(a.render(&img, &p, &mut out).is_err());
    // So is an output of the wrong length.
    assert!(a
        .render(
            &img,
            &CropParams {
                offset: (0, 0),
                ..p
            },
            &mut out[1..]
        )
        .is_err());
}

#[test]
fn flips_mirror_the_crop() {
    let img = random_image(3, 8, 8, 2);
    let a = identity_aug(3, 6, (8, 8), 8);
    let base = CropParams {
        scaled: (8, 8),
        offset: (1, 2),
        hflip: false,
        vflip: false,
    };
    let plain = render(&a, &img, base);
    let h = render(
        &a,
        &img,
        CropParams {
            hflip: true,
            ..base
        },
    );
    let v = render(
        &a,
        &img,
        CropParams {
            vflip: true,
            ..base
        },
    );
    let hv = render(
        &a,
        &img,
        CropParams {
            hflip: true,
            vflip: true,
            ..base
        },
    );
    for c in 0..3 {
        for y in 0..6 {
            for x in 0..6 {
                let at = |t: &[f32], y: usize, x: usize| t[(c * 6 + y) * 6 + x];
                assert_eq!(at(&h, y, x), at(&plain, y, 5 - x));
                assert_eq!(at(&v, y, x), at(&plain, 5 - y, x));
                assert_eq!(at(&hv, y, x), at(&plain, 5 - y, 5 - x));
            }
        }
    }
    assert_ne!(plain, h);
}

#[test]
fn drawn_crops_stay_inside_and_flips_follow_the_options() {
    let mut a = identity_aug(1, 16, (20, 26), 18);
    let mut r = rng::seeded(4);
    let (mut sides, mut flips) = (std::collections::BTreeSet::new(), 0);
    for _ in 0..400 {
        let p = a.train_params((20, 30), &mut r).unwrap();
        let short = p.scaled.0.min(p.scaled.1);
        assert!((20..=26).contains(&short), "{p:?}");
        // Aspect ratio kept: 20 x 30 -> short x 1.5 short (rounded).
        assert_eq!(p.scaled.1, (short * 30 + 10) / 20);
        assert!(p.offset.0 + 16 <= p.scaled.0 && p.offset.1 + 16 <= p.scaled.1);
        assert!(!p.hflip && !p.vflip, "flips are off");
        sides.insert(short);
    }
    assert_eq!(sides.len(), 7, "every side in [20, 26] is drawn: {sides:?}");
    a.hflip = true;
    for _ in 0..400 {
        let p = a.train_params((20, 30), &mut r).unwrap();
        flips += p.hflip as usize;
        assert!(!p.vflip);
    }
    assert!((140..260).contains(&flips), "{flips} of 400 flipped");
    // Evaluation: shorter side to 18, centred crop, never flipped.
    let e = a.eval_params((20, 30)).unwrap();
    assert_eq!(e.scaled, (18, 27));
    assert_eq!(e.offset, (1, 5));
    assert!(!e.hflip && !e.vflip);
}

#[test]
fn resizing_is_bilinear_and_normalisation_per_channel() {
    // 2x2 blocks downscaled by exactly 2 give the block values back.
    let mut data = vec![0u8; 8 * 8];
    for y in 0..8 {
        for x in 0..8 {
            data[y * 8 + x] = (10 * (y / 2) + 40 * (x / 2)) as u8;
        }
    }
    let img = Image::new(1, 8, 8, data).unwrap();
    let a = identity_aug(1, 4, (4, 4), 4);
    let out = render(&a, &img, a.eval_params((8, 8)).unwrap());
    for y in 0..4 {
        for x in 0..4 {
            assert!(close(out[y * 4 + x], (10 * y + 40 * x) as f32), "{y},{x}");
        }
    }
    // A constant image stays constant at any scale; mean and std act per channel.
    let img = Image::new(2, 5, 7, [vec![51u8; 35], vec![204u8; 35]].concat()).unwrap();
    let a = Augment {
        mean: vec![0.2, 0.5],
        std: vec![0.5, 0.25],
        ..identity_aug(2, 4, (6, 13), 9)
    };
    let mut out = vec![0.0; a.sample_len(2)];
    a.train_sample(&img, &mut rng::seeded(1), &mut out).unwrap();
    let (c0, c1) = ((0.2 - 0.2) / 0.5, (0.8 - 0.5) / 0.25);
    assert!(
        out[..16].iter().all(|&v| (v - c0).abs() < 1e-5),
        "{:?}",
        &out[..16]
    );
    assert!(
        out[16..].iter().all(|&v| (v - c1).abs() < 1e-5),
        "{:?}",
        &out[16..]
    );
}

#[test]
fn invalid_transforms_are_errors() {
    let img = random_image(1, 8, 8, 5);
    let mut out = vec![0.0; 16];
    let ok = identity_aug(1, 4, (6, 8), 6);
    assert!(ok.eval_sample(&img, &mut out).is_ok());
    for bad in [
        Augment {
            scale_min: 3,
            ..ok.clone()
        },
        Augment {
            scale_max: 5,
            ..ok.clone()
        },
        Augment {
            eval_resize: 3,
            ..ok.clone()
        },
        Augment {
            std: vec![0.0],
            ..ok.clone()
        },
        Augment {
            mean: vec![0.0, 0.0],
            ..ok.clone()
        },
    ] {
        assert!(bad.eval_sample(&img, &mut out).is_err(), "{bad:?}");
    }
}

#[test]
fn default_scaling_follows_the_paper() {
    let p = Augment::defaults(DataKind::Photos, None, None, vec![0.5; 3], vec![0.5; 3]);
    assert_eq!(
        (
            p.scale_min,
            p.scale_max,
            p.crop,
            p.eval_resize,
            p.hflip,
            p.vflip
        ),
        (256, 480, 224, 256, true, false)
    );
    let d = Augment::defaults(DataKind::Digits, Some((28, 28)), None, vec![0.1], vec![0.3]);
    assert_eq!(
        (d.scale_min, d.scale_max, d.crop, d.eval_resize, d.hflip),
        (32, 36, 28, 32, false)
    );
    let c = Augment::defaults(
        DataKind::Tiny,
        Some((32, 32)),
        None,
        vec![0.5; 3],
        vec![0.2; 3],
    );
    assert_eq!(
        (c.scale_min, c.scale_max, c.crop, c.eval_resize, c.hflip),
        (37, 41, 32, 37, true)
    );
}

fn tiny_set(n: usize, size: (usize, usize, usize)) -> InMemory {
    let (c, h, w) = size;
    let px = rng::uniform_vec(n * c * h * w, 0.0, 256.0, 9)
        .into_iter()
        .map(|v| v as u8)
        .collect();
    InMemory::new(
        "tiny",
        size,
        3,
        px,
        (0..n).map(|i| (i % 3) as u16).collect(),
    )
    .unwrap()
}

#[test]
fn batches_are_seeded_and_the_loader_matches_them() {
    let ds: Arc<dyn Dataset> = Arc::new(tiny_set(10, (2, 12, 12)));
    let a = Augment {
        hflip: true,
        vflip: true,
        ..identity_aug(2, 8, (9, 14), 10)
    };
    let order = epoch_order(10, 7, 0);
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>(), "a permutation");
    assert_ne!(order, epoch_order(10, 7, 1), "each epoch reshuffles");
    let train = Sampling::Train { seed: 7, epoch: 0 };
    let b0 = make_batch(ds.as_ref(), &order, 4, 0, &a, train).unwrap();
    assert_eq!(b0.x.shape(), senet::Shape::new(4, 2, 8, 8));
    assert_eq!(
        b0.labels,
        order[..4].iter().map(|&i| i % 3).collect::<Vec<_>>()
    );
    assert_eq!(
        b0,
        make_batch(ds.as_ref(), &order, 4, 0, &a, train).unwrap()
    );
    let other = Sampling::Train { seed: 8, epoch: 0 };
    assert_ne!(
        b0.x,
        make_batch(ds.as_ref(), &order, 4, 0, &a, other).unwrap().x
    );
    // The last batch is short; past the end is an error.
    assert_eq!(
        make_batch(ds.as_ref(), &order, 4, 2, &a, train)
            .unwrap()
            .labels
            .len(),
        2
    );
    assert!(make_batch(ds.as_ref(), &order, 4, 3, &a, train).is_err());
    // The prefetching loader yields the same batches, in order, for the range asked.
    let loaded: Vec<_> = Loader::spawn(ds.clone(), order.clone(), 4, 1..3, a.clone(), train, 1)
        .map(Result::unwrap)
        .collect();
    assert_eq!(loaded.len(), 2);
    for b in &loaded {
        assert_eq!(
            *b,
            make_batch(ds.as_ref(), &order, 4, b.index, &a, train).unwrap()
        );
    }
    // Evaluation batches are deterministic and identical for every caller.
    let e = make_batch(ds.as_ref(), &order, 4, 0, &a, Sampling::Eval).unwrap();
    assert_eq!(
        e,
        make_batch(ds.as_ref(), &order, 4, 0, &a, Sampling::Eval).unwrap()
    );
    // A loader whose data fails stops with the error.
    let bad = Augment {
        mean: vec![0.0],
        ..a.clone()
    };
    let mut l = Loader::spawn(ds, order, 4, 0..3, bad, train, 2);
    assert!(l.next().unwrap().is_err());
    assert!(l.next().is_none());
}

// ---- IDX ----

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn idx_files_load_raw_or_gzipped() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let train_px: Vec<u8> = (0..5 * 4 * 3).map(|i| i as u8).collect();
    let test_px: Vec<u8> = (0..2 * 4 * 3).map(|i| 200 - i as u8).collect();
    // Train raw with MNIST's names, test gzipped with the dotted spelling.
    write(
        &d.join("train-images-idx3-ubyte"),
        &idx_bytes(&[5, 4, 3], &train_px),
    );
    write(
        &d.join("train-labels-idx1-ubyte"),
        &idx_bytes(&[5], &[3, 1, 4, 1, 5]),
    );
    write(
        &d.join("t10k-images.idx3-ubyte.gz"),
        &gz(&idx_bytes(&[2, 4, 3], &test_px)),
    );
    write(
        &d.join("t10k-labels.idx1-ubyte.gz"),
        &gz(&idx_bytes(&[2], &[9, 2])),
    );
    let split = DataSpec::Idx(d.to_path_buf()).load().unwrap();
    assert_eq!((split.train.len(), split.test.len()), (5, 2));
    assert_eq!(split.num_classes(), 10);
    assert_eq!(split.image_size, Some((4, 3)));
    assert_eq!(split.kind, DataKind::Digits);
    let img = split.train.image(2).unwrap();
    assert_eq!((img.channels, img.height, img.width), (1, 4, 3));
    assert_eq!(img.data, train_px[24..36].to_vec());
    assert_eq!(split.train.label(2).unwrap(), 4);
    assert_eq!(split.test.image(1).unwrap().data, test_px[12..24].to_vec());
    assert_eq!(split.test.label(0).unwrap(), 9);
    let mean = train_px.iter().map(|&p| p as f64).sum::<f64>() / 60.0 / 255.0;
    assert!((split.mean[0] as f64 - mean).abs() < 1e-6);
}

fn expect_format_error(r: Result<impl Sized, Error>, what: &str) {
    match r {
        Err(e) => assert!(
            e.to_string().contains(what),
            "error `{e}` does not mention `{what}`"
        ),
        Ok(_) => panic!("expected an error mentioning `{what}`"),
    }
}

#[test]
fn malformed_idx_files_are_errors() {
    let img = idx_bytes(&[2, 2, 2], &[0; 8]);
    let lab = idx_bytes(&[2], &[0, 1]);
    let ok = idx::from_idx_bytes("t", img.clone(), lab.clone(), 10).unwrap();
    assert_eq!(ok.len(), 2);
    let mut bad_magic = img.clone();
    bad_magic[0] = 7;
    expect_format_error(
        idx::from_idx_bytes("t", bad_magic, lab.clone(), 10),
        "magic",
    );
    let mut bad_type = img.clone();
    bad_type[2] = 0x0d;
    expect_format_error(idx::from_idx_bytes("t", bad_type, lab.clone(), 10), "type");
    expect_format_error(
        idx::from_idx_bytes("t", img[..img.len() - 1].to_vec(), lab.clone(), 10),
        "need 8 bytes",
    );
    expect_format_error(
        idx::from_idx_bytes("t", img[..6].to_vec(), lab.clone(), 10),
        "truncated",
    );
    expect_format_error(
        idx::from_idx_bytes("t", img.clone(), idx_bytes(&[3], &[0, 1, 2]), 10),
        "labels",
    );
    expect_format_error(
        idx::from_idx_bytes("t", lab.clone(), lab.clone(), 10),
        "3 dimensions",
    );
    let mut broken_gz = gz(&img);
    let n = broken_gz.len();
    broken_gz.truncate(n / 2);
    expect_format_error(idx::from_idx_bytes("t", broken_gz, lab, 10), "gzip");
    let dir = tempfile::tempdir().unwrap();
    expect_format_error(
        DataSpec::Idx(dir.path().to_path_buf()).load(),
        "no train-images",
    );
}

// ---- CIFAR ----

fn cifar_record(label_bytes: &[u8], seed: u8) -> Vec<u8> {
    let mut r = label_bytes.to_vec();
    r.extend((0..3072).map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed)));
    r
}

#[test]
fn cifar_binaries_load() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("cifar-10-batches-bin");
    for b in 1..=5u8 {
        let recs = [cifar_record(&[b], b), cifar_record(&[9 - b], b + 10)].concat();
        write(&base.join(format!("data_batch_{b}.bin")), &recs);
    }
    write(&base.join("test_batch.bin"), &cifar_record(&[7], 99));
    // The folder above the batches works too.
    let split = DataSpec::Cifar10(dir.path().to_path_buf()).load().unwrap();
    assert_eq!((split.train.len(), split.test.len()), (10, 1));
    assert_eq!(split.kind, DataKind::Tiny);
    assert_eq!(split.train.label(2).unwrap(), 2);
    assert_eq!(split.train.label(3).unwrap(), 7);
    let img = split.train.image(3).unwrap();
    let rec = cifar_record(&[7], 12);
    assert_eq!((img.channels, img.height, img.width), (3, 32, 32));
    // Planes are red, green, blue, rows of 32.
    assert_eq!(img.at(0, 0, 5), rec[1 + 5]);
    assert_eq!(img.at(1, 2, 3), rec[1 + 1024 + 2 * 32 + 3]);
    assert_eq!(img.at(2, 31, 31), rec[3072]);
    assert_eq!(split.test.label(0).unwrap(), 7);

    // CIFAR-100: coarse then fine label; the fine one counts.
    let d100 = tempfile::tempdir().unwrap();
    write(
        &d100.path().join("train.bin"),
        &[cifar_record(&[3, 87], 1), cifar_record(&[19, 0], 2)].concat(),
    );
    write(&d100.path().join("test.bin"), &cifar_record(&[0, 99], 3));
    let s = DataSpec::Cifar100(d100.path().to_path_buf())
        .load()
        .unwrap();
    assert_eq!(s.num_classes(), 100);
    assert_eq!(s.train.label(0).unwrap(), 87);
    assert_eq!(s.test.label(0).unwrap(), 99);
}

#[test]
fn malformed_cifar_files_are_errors() {
    let (mut px, mut lab) = (Vec::new(), Vec::new());
    let rec = cifar_record(&[1], 1);
    let v = cifar::Variant::Cifar10;
    cifar::parse_records(&rec, v, "t", &mut px, &mut lab).unwrap();
    expect_format_error(
        cifar::parse_records(&rec[..100], v, "t", &mut px, &mut lab),
        "whole number",
    );
    expect_format_error(
        cifar::parse_records(&cifar_record(&[10], 1), v, "t", &mut px, &mut lab),
        "label 10",
    );
    expect_format_error(
        cifar::parse_records(&[], v, "t", &mut px, &mut lab),
        "whole number",
    );
    let dir = tempfile::tempdir().unwrap();
    expect_format_error(
        DataSpec::Cifar10(dir.path().to_path_buf()).load(),
        "test_batch.bin",
    );
    // A missing training batch is an I/O error naming the file.
    write(&dir.path().join("test_batch.bin"), &rec);
    expect_format_error(
        DataSpec::Cifar10(dir.path().to_path_buf()).load(),
        "data_batch_1.bin",
    );
}

// ---- ImageFolder ----

fn save_rgb(path: &Path, w: u32, h: u32, seed: u32, format: image::ImageFormat) -> Vec<u8> {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let raw: Vec<u8> = (0..w * h * 3)
        .map(|i| (i.wrapping_mul(37).wrapping_add(seed * 11) % 251) as u8)
        .collect();
    image::save_buffer_with_format(path, &raw, w, h, image::ExtendedColorType::Rgb8, format)
        .unwrap();
    raw
}

#[test]
fn image_folders_load_png_and_jpeg() {
    use image::ImageFormat::{Jpeg, Png};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let raw = save_rgb(&root.join("train/dog/b.png"), 5, 3, 1, Png);
    save_rgb(&root.join("train/dog/sub/a.PNG"), 4, 4, 2, Png);
    save_rgb(&root.join("train/cat/x.jpg"), 16, 8, 3, Jpeg);
    save_rgb(&root.join("train/cat/y.jpeg"), 8, 16, 4, Jpeg);
    write(&root.join("train/cat/notes.txt"), b"not an image");
    // A grey PNG decodes to three equal channels.
    std::fs::create_dir_all(root.join("val/dog")).unwrap();
    image::save_buffer_with_format(
        root.join("val/dog/g.png"),
        &[10, 20, 30, 40],
        2,
        2,
        image::ExtendedColorType::L8,
        Png,
    )
    .unwrap();
    let split = DataSpec::Folder(root.to_path_buf()).load().unwrap();
    assert_eq!(split.kind, DataKind::Photos);
    assert_eq!(split.image_size, None);
    assert_eq!((split.train.len(), split.test.len()), (4, 1));
    assert_eq!(split.num_classes(), 2);
    // Classes sorted by name (cat = 0, dog = 1); files sorted by path, recursively.
    let labels: Vec<usize> = (0..4).map(|i| split.train.label(i).unwrap()).collect();
    assert_eq!(labels, vec![0, 0, 1, 1]);
    let png = split.train.image(2).unwrap();
    assert_eq!((png.channels, png.height, png.width), (3, 3, 5));
    for (i, px) in raw.chunks_exact(3).enumerate() {
        let (y, x) = (i / 5, i % 5);
        assert_eq!(
            [png.at(0, y, x), png.at(1, y, x), png.at(2, y, x)],
            [px[0], px[1], px[2]]
        );
    }
    let jpg = split.train.image(0).unwrap();
    assert_eq!((jpg.channels, jpg.height, jpg.width), (3, 8, 16));
    let grey = split.test.image(0).unwrap();
    assert_eq!(grey.at(0, 1, 0), 30);
    assert_eq!(grey.at(2, 1, 0), 30);
    assert_eq!(split.test.label(0).unwrap(), 1);
    // Images of different sizes batch to one crop size.
    let a = Augment {
        mean: split.mean.clone(),
        std: split.std.clone(),
        ..identity_aug(3, 4, (4, 6), 5)
    };
    let order: Vec<usize> = (0..4).collect();
    let b = make_batch(
        split.train.as_ref(),
        &order,
        4,
        0,
        &a,
        Sampling::Train { seed: 1, epoch: 0 },
    )
    .unwrap();
    assert_eq!(b.x.shape(), senet::Shape::new(4, 3, 4, 4));
}

#[test]
fn broken_image_folders_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // No class folders.
    std::fs::create_dir_all(root.join("empty")).unwrap();
    expect_format_error(
        folder::ImageFolder::open(&root.join("empty"), None),
        "no class folders",
    );
    // Class folders without images.
    std::fs::create_dir_all(root.join("noimg/a")).unwrap();
    expect_format_error(
        folder::ImageFolder::open(&root.join("noimg"), None),
        "no .jpg",
    );
    // A corrupt JPEG fails when read, with its path, without panicking.
    write(
        &root.join("bad/train/a/broken.jpg"),
        b"\xff\xd8\xff\xe0 definitely not a jpeg",
    );
    write(
        &root.join("bad/train/b/trunc.png"),
        &b"\x89PNG\r\n\x1a\n"[..],
    );
    std::fs::create_dir_all(root.join("bad/val/a")).unwrap();
    save_rgb(
        &root.join("bad/val/a/ok.png"),
        2,
        2,
        1,
        image::ImageFormat::Png,
    );
    let split = DataSpec::Folder(root.join("bad")).load().unwrap();
    expect_format_error(split.train.image(0), "broken.jpg");
    expect_format_error(split.train.image(1), "trunc.png");
    assert!(split.train.image(2).is_err());
    assert!(split.test.image(0).is_ok());
    // A validation class the training set lacks.
    save_rgb(
        &root.join("bad/val/zebra/z.png"),
        2,
        2,
        1,
        image::ImageFormat::Png,
    );
    expect_format_error(DataSpec::Folder(root.join("bad")).load(), "zebra");
    // No validation folder.
    expect_format_error(DataSpec::Folder(root.join("noimg")).load(), "listing");
    std::fs::create_dir_all(root.join("noval/train/a")).unwrap();
    save_rgb(
        &root.join("noval/train/a/p.png"),
        2,
        2,
        1,
        image::ImageFormat::Png,
    );
    expect_format_error(DataSpec::Folder(root.join("noval")).load(), "no val/");
    // Bytes that are no image at all.
    expect_format_error(folder::decode_bytes(b"hello", "mem"), "mem");
}
