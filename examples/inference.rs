//! Times model preparation and inference alone, without downloads or
//! decoding: `cargo run --release --example inference -- MODEL IMAGE...`
//!
//! Prints the preparation time on one thread and on every CPU, then the median time per image when one
//! thread classifies the images one by one, and when every CPU does so at
//! once on the shared plan. `ARITHMETIC=float` times the model as
//! `--arithmetic float` runs it (the default is `quantized`).

use std::time::{Duration, Instant};

use classifier::model::{Arithmetic, Model};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    // As the binary does.
    classifier::tune_allocator();
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() >= 2, "usage: inference MODEL IMAGE...");
    let bytes = std::fs::read(&args[0])?;
    let threads = std::thread::available_parallelism()?.get();
    let arithmetic = match std::env::var("ARITHMETIC").as_deref() {
        Ok("float") => Arithmetic::Float,
        Ok("rounded") => Arithmetic::Rounded,
        Ok("quantized") | Err(_) => Arithmetic::Quantized,
        Ok(other) => anyhow::bail!("ARITHMETIC={other:?}: expected quantized, rounded or float"),
    };
    // Taken in turn, so that both share the machine's noise alike.
    let (mut alone, mut together) = (vec![], vec![]);
    for _ in 0..5 {
        for (n, times) in [(1, &mut alone), (threads, &mut together)] {
            let t = Instant::now();
            Model::load(&bytes, n, None, arithmetic)?;
            times.push(t.elapsed());
        }
    }
    println!(
        "prepare (bytes to runnable plan), median of 5: {:?} on 1 thread, {:?} on {threads}",
        median(alone),
        median(together)
    );
    let model = Model::load(&bytes, threads, None, arithmetic)?;
    let input = model.input();
    let images: Vec<Vec<u8>> = args[1..]
        .iter()
        .map(|p| {
            Ok(classifier::image::prepare(&std::fs::read(p)?, true, input.width, input.height, Default::default())?)
        })
        .collect::<anyhow::Result<_>>()?;
    let rounds = 5;
    let per_image = |model: &Model| -> anyhow::Result<Vec<Duration>> {
        let mut times = vec![];
        // As a worker of the engine runs: one session, kept from image to image.
        let mut session = model.session()?;
        for _ in 0..rounds {
            for image in &images {
                let t = Instant::now();
                session.classify(image)?;
                times.push(t.elapsed());
            }
        }
        Ok(times)
    };
    println!("1 thread: median {:?} per image", median(per_image(&model)?));
    let t = Instant::now();
    let all = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(|| per_image(&model))).collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect::<anyhow::Result<Vec<_>>>()
    })?;
    let wall = t.elapsed();
    let count = threads * rounds * images.len();
    println!(
        "{threads} threads at once: median {:?} per image per thread, {:.1} images/s together ({:.1} ms per image)",
        median(all.concat()),
        count as f64 / wall.as_secs_f64(),
        wall.as_secs_f64() * 1e3 / count as f64
    );
    Ok(())
}
