//! Processes joined by MPI (the `mpi` feature, Open MPI through rsmpi).
//!
//! One [`MpiProcesses`] per process wraps the world communicator. Only one thread of a process
//! (its local rank 0) calls into MPI at a time; MPI is initialised with `MPI_THREAD_MULTIPLE` so
//! that thread may be any thread, and so the watchdog may abort the job from its own thread.
//!
//! * Every operation first agrees on a fingerprint of what each process passes (operation,
//!   dtypes, shapes): a mismatch becomes an error on every process instead of a hang or silent
//!   corruption.
//! * The watchdog turns an operation that outlives the collective timeout into `MPI_Abort`,
//!   after printing which rank waited in which operation and which process is to blame: it
//!   calls the roll on a communicator of its own, where every process's watchdog answers
//!   whether it waits in a collective or is outside them all (stuck in the program's code), and
//!   a process that does not answer is stopped, hung or cut off. `mpirun` then ends every
//!   process with a non-zero exit.
//! * Reduction buffers are recycled, so a steady training loop allocates nothing here.
//!
//! MPI can be initialised only once per process, so the world lives until the process exits
//! (finalised by an `atexit` handler): several Fabrics in one process share it.

use crate::collective::flat_len;
use crate::reduce::{aligned, check_supported_in};
use crate::{ReduceOp, check_rank};
use burn::tensor::{BoolStore, DType, TensorData};
use fabric_core::CollectiveError;
use fabric_core::FabricError;
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::{Threading, Universe};
use mpi::point_to_point::Source;
use mpi::raw::AsRaw;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The MPI world of this process, shared by its rank threads.
pub struct MpiProcesses {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    watchdog: Watchdog,
    recycled: Mutex<Vec<TensorData>>,
    /// Never dropped (dropping finalises MPI); `finalize_at_exit` ends MPI instead.
    #[allow(dead_code)]
    universe: std::mem::ManuallyDrop<Universe>,
}

// SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE (checked in `init`), which allows any
// thread to use the communicator; rsmpi's handles are plain MPI handles.
unsafe impl Send for MpiProcesses {}
// SAFETY: as above; `recycled` and the watchdog synchronise themselves.
unsafe impl Sync for MpiProcesses {}

static WORLD: Mutex<Option<Arc<MpiProcesses>>> = Mutex::new(None);
/// Launches in progress in this process, and the process's MPI rank.
static TRAINING: AtomicUsize = AtomicUsize::new(0);
static PROCESS_RANK: AtomicUsize = AtomicUsize::new(0);
/// Ranks (threads) each process runs, to name a process's ranks in messages.
static RANKS_PER_PROCESS: AtomicUsize = AtomicUsize::new(1);
/// Held while the watchdog calls MPI; `true` once MPI is finalised (the watchdog then stops).
static MPI_GATE: Mutex<bool> = Mutex::new(false);

/// At exit: a process leaving in the middle of a launch would leave the others waiting, so it
/// aborts the job; otherwise MPI is finalised (every process of the job must).
extern "C" fn finalize_at_exit() {
    if TRAINING.load(Ordering::SeqCst) > 0 {
        eprintln!(
            "burn-fabric: process {} exited in the middle of training; aborting the job",
            PROCESS_RANK.load(Ordering::SeqCst)
        );
        // SAFETY: MPI is initialised (TRAINING is only raised after that); MPI_Abort does not
        // return on success.
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 5);
        }
        return;
    }
    let mut finalized = MPI_GATE.lock().unwrap_or_else(PoisonError::into_inner);
    if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
        // SAFETY: called once, at exit, after every MPI operation of this process (the
        // watchdog's are shut out by the gate held here).
        unsafe {
            mpi::ffi::MPI_Finalize();
        }
    }
    *finalized = true;
}

impl MpiProcesses {
    /// The process's MPI world, initialising MPI on first use; later calls (later Fabrics)
    /// share it. `timeout` is the watchdog's, set by the first call.
    pub fn get(timeout: Duration) -> Result<Arc<Self>, FabricError> {
        let mut world = WORLD.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = world.as_ref() {
            return Ok(Arc::clone(existing));
        }
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| FabricError::Unsupported {
                what: "initialising MPI".into(),
                reason: "MPI was already initialised outside burn-fabric".into(),
            })?;
        if threading < Threading::Multiple {
            return Err(FabricError::Unsupported {
                what: format!("MPI with thread support {threading:?}"),
                reason: "burn-fabric needs MPI_THREAD_MULTIPLE (rank threads and the watchdog call MPI); use an Open MPI built with it (Debian's is)".into(),
            });
        }
        // SAFETY: registering a plain `extern "C"` function.
        unsafe {
            libc::atexit(finalize_at_exit);
        }
        let communicator = universe.world();
        let rank = usize::try_from(communicator.rank()).unwrap_or(0);
        let size = usize::try_from(communicator.size()).unwrap_or(1);
        PROCESS_RANK.store(rank, Ordering::SeqCst);
        // The watchdog's own communicator: its roll call never mixes with the ranks' messages.
        let roll = communicator.duplicate();
        let processes = Arc::new(Self {
            world: communicator,
            rank,
            size,
            // A little later than the in-process timeout, so that when the late rank is a thread
            // of some process, that process names it before the watchdog fires.
            watchdog: Watchdog::start(timeout + (timeout / 10).max(Duration::from_secs(1)), roll),
            recycled: Mutex::new(Vec::new()),
            universe: std::mem::ManuallyDrop::new(universe),
        });
        *world = Some(Arc::clone(&processes));
        Ok(processes)
    }

    /// Marks a launch in progress until the guard drops: exiting the process meanwhile aborts
    /// the job instead of finalising MPI quietly while the other processes wait.
    pub fn training(&self) -> Training {
        TRAINING.fetch_add(1, Ordering::SeqCst);
        Training(())
    }

    /// This process's index.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Records how many ranks each process runs (for naming a process's ranks).
    pub fn set_ranks_per_process(&self, ranks: usize) {
        RANKS_PER_PROCESS.store(ranks.max(1), Ordering::SeqCst);
    }

    /// Checks that every process was started with the same `settings` (one line, e.g.
    /// `devices=2 strategy=ddp ...`): otherwise every process returns the same error, naming
    /// the first process that differs from process 0 and both lines, instead of a hang later.
    pub fn agree_on_settings(&self, settings: &str) -> Result<(), FabricError> {
        const WIDTH: usize = 512;
        let mut mine = [0u8; WIDTH];
        let bytes = &settings.as_bytes()[..settings.len().min(WIDTH)];
        mine[..bytes.len()].copy_from_slice(bytes);
        let mut all = vec![0u8; WIDTH * self.size];
        // Watched like any collective: a process that never arrives ends the job, not hangs it.
        let _watch = self.watchdog.enter(self.rank, "settings agreement");
        self.world.all_gather_into(&mine[..], &mut all[..]);
        let line = |p: usize| {
            let raw = &all[p * WIDTH..(p + 1) * WIDTH];
            let end = raw.iter().position(|b| *b == 0).unwrap_or(WIDTH);
            String::from_utf8_lossy(&raw[..end]).into_owned()
        };
        match (1..self.size).find(|p| line(*p) != line(0)) {
            None => Ok(()),
            Some(p) => Err(FabricError::InvalidSetting {
                setting: "settings of the job's processes",
                value: format!("process {p} has `{}`", line(p)),
                valid: format!(
                    "the same settings in every process; process 0 has `{}` (start every process with the same `fabric run` flags and LT_* variables)",
                    line(0)
                ),
            }),
        }
    }

    /// Prints `message` and ends the whole job with a non-zero exit.
    pub fn abort(&self, message: &str) -> ! {
        eprintln!("burn-fabric: aborting the MPI job: {message}");
        self.world.abort(3)
    }

    /// Agrees that every process calls the same operation on compatible data: each contributes a
    /// fingerprint; a process whose fingerprint differs from process 0's is named.
    fn agree(
        &self,
        rank: usize,
        operation: &'static str,
        fingerprint: u64,
    ) -> Result<(), CollectiveError> {
        let mut all = vec![0u64; self.size];
        self.world.all_gather_into(&fingerprint, &mut all[..]);
        match all.iter().position(|f| *f != all[0]) {
            None => Ok(()),
            Some(process) => Err(CollectiveError::Mismatch {
                rank,
                detail: format!(
                    "process {process} called `{operation}` with other data (or another operation) than process 0"
                ),
            }),
        }
    }

    /// Combines each buffer across processes with `op` (`Mean` sums; the caller divides).
    pub fn all_reduce_many(
        &self,
        rank: usize,
        data: Vec<TensorData>,
        op: ReduceOp,
    ) -> Result<Vec<TensorData>, CollectiveError> {
        let _watch = self.watchdog.enter(rank, "all_reduce");
        self.agree(rank, "all_reduce", fingerprint(1 + op as u64, &data))?;
        data.into_iter()
            .map(|d| self.reduce(d, op, false))
            .collect()
    }

    /// This process's block of the combination of every process's `data` (one dimension, its
    /// length `n` a multiple of the number of processes, the same on every process): elements
    /// `[process * n / size, (process + 1) * n / size)`, through `MPI_Reduce_scatter_block`
    /// (`Mean` sums; the caller divides). Half types are combined in f32.
    pub fn reduce_scatter(
        &self,
        rank: usize,
        data: TensorData,
        op: ReduceOp,
    ) -> Result<TensorData, CollectiveError> {
        let _watch = self.watchdog.enter(rank, "reduce_scatter");
        let numel = flat_len(&data, "reduce_scatter", rank, Some(self.size))?;
        check_supported_in(&data, op, "reduce_scatter")?;
        fits_count(numel, rank, "reduce_scatter")?;
        self.agree(
            rank,
            "reduce_scatter",
            fingerprint(0x5C0 + op as u64, std::slice::from_ref(&data)),
        )?;
        self.reduce(data, op, true)
    }

    /// Every process's `data` (one dimension, the same length and dtype on every process) back
    /// to back in process order, through `MPI_Allgather`.
    pub fn all_gather_flat(
        &self,
        rank: usize,
        data: TensorData,
    ) -> Result<TensorData, CollectiveError> {
        let _watch = self.watchdog.enter(rank, "all_gather_flat");
        let numel = flat_len(&data, "all_gather_flat", rank, None)?;
        fits_count(data.bytes.len() * self.size, rank, "all_gather_flat")?;
        self.agree(
            rank,
            "all_gather_flat",
            fingerprint(0xA7F, std::slice::from_ref(&data)),
        )?;
        let data = aligned(data);
        let mut all = self.scratch_of(data.dtype, numel * self.size);
        {
            let send: &[u8] = &data.bytes;
            let recv: &mut [u8] = &mut all.bytes;
            self.world.all_gather_into(send, recv);
        }
        Ok(all)
    }

    /// `all_reduce` of `data`, or with `scatter` its `reduce_scatter` (the length is checked to
    /// divide among the processes).
    fn reduce(
        &self,
        data: TensorData,
        op: ReduceOp,
        scatter: bool,
    ) -> Result<TensorData, CollectiveError> {
        let operation = if scatter {
            "reduce_scatter"
        } else {
            "all_reduce"
        };
        let op = match op {
            ReduceOp::Sum | ReduceOp::Mean => SystemOperation::sum(),
            ReduceOp::Min => SystemOperation::min(),
            ReduceOp::Max => SystemOperation::max(),
        };
        match data.dtype {
            DType::F32 | DType::Flex32 => self.reduce_as::<f32>(data, op, scatter),
            DType::F64 => self.reduce_as::<f64>(data, op, scatter),
            DType::I64 => self.reduce_as::<i64>(data, op, scatter),
            DType::I32 => self.reduce_as::<i32>(data, op, scatter),
            DType::I16 => self.reduce_as::<i16>(data, op, scatter),
            DType::I8 => self.reduce_as::<i8>(data, op, scatter),
            DType::U64 => self.reduce_as::<u64>(data, op, scatter),
            DType::U32 | DType::Bool(BoolStore::U32) => self.reduce_as::<u32>(data, op, scatter),
            DType::U16 => self.reduce_as::<u16>(data, op, scatter),
            DType::U8 | DType::Bool(_) => self.reduce_as::<u8>(data, op, scatter),
            // MPI has no half types: reduce in f32 (as the in-process engine accumulates).
            DType::F16 | DType::BF16 => {
                let dtype = data.dtype;
                Ok(self
                    .reduce_as::<f32>(data.convert_dtype(DType::F32), op, scatter)?
                    .convert_dtype(dtype))
            }
            DType::QFloat(_) => Err(CollectiveError::UnsupportedDtype {
                operation,
                dtype: format!("{:?}", data.dtype),
            }),
        }
    }

    /// With `scatter` (`MPI_Reduce_scatter_block`) this process receives its block of
    /// `numel / size` elements; the caller has checked that they divide.
    fn reduce_as<T: Equivalence + bytemuck::Pod>(
        &self,
        send: TensorData,
        op: SystemOperation,
        scatter: bool,
    ) -> Result<TensorData, CollectiveError> {
        let send = aligned(send);
        let mut recv = if scatter {
            self.scratch_of(send.dtype, send.num_elements() / self.size.max(1))
        } else {
            self.scratch(&send)
        };
        let bad = |e: bytemuck::PodCastError| CollectiveError::Mismatch {
            rank: self.rank,
            detail: format!(
                "buffer of {:?} cannot be read as its elements: {e}",
                send.dtype
            ),
        };
        {
            let input: &[T] = bytemuck::try_cast_slice(&send.bytes).map_err(bad)?;
            let output: &mut [T] = bytemuck::try_cast_slice_mut(&mut recv.bytes).map_err(bad)?;
            if scatter {
                self.world.reduce_scatter_block_into(input, output, op);
            } else {
                self.world.all_reduce_into(input, output, op);
            }
        }
        // A scattered send is `size` times its result: keeping it would hold memory that no
        // later result of the same size reuses.
        if !scatter {
            self.recycle(send);
        }
        Ok(recv)
    }

    /// A buffer shaped like `like`, from the recycled ones when one has the same size.
    fn scratch(&self, like: &TensorData) -> TensorData {
        let mut buffer = self.scratch_of(like.dtype, like.num_elements());
        buffer.shape = like.shape.clone();
        buffer
    }

    /// A one-dimensional buffer of `numel` elements of `dtype`, from the recycled ones when one
    /// has the same size.
    fn scratch_of(&self, dtype: DType, numel: usize) -> TensorData {
        let mut recycled = self.recycled.lock().unwrap_or_else(PoisonError::into_inner);
        let found = recycled
            .iter()
            .position(|d| d.dtype == dtype && d.bytes.len() == numel * dtype.size());
        let mut buffer = match found {
            Some(i) => recycled.swap_remove(i),
            None => aligned(TensorData::full_dtype([numel], 0, dtype)),
        };
        buffer.shape = [numel].into();
        buffer
    }

    fn recycle(&self, buffer: TensorData) {
        let mut recycled = self.recycled.lock().unwrap_or_else(PoisonError::into_inner);
        recycled.push(buffer);
        if recycled.len() > 16 {
            recycled.remove(0);
        }
    }

    /// Process `root`'s buffers on every process (the others' `data` is ignored).
    pub fn broadcast_many(
        &self,
        rank: usize,
        data: Vec<TensorData>,
        root: usize,
    ) -> Result<Vec<TensorData>, CollectiveError> {
        let _watch = self.watchdog.enter(rank, "broadcast");
        check_rank(root, self.size)?;
        self.agree(rank, "broadcast", root as u64 + 0xB0)?;
        let root_process = self.world.process_at_rank(root as i32);
        // Header: number of buffers, then dtype code, rank and dims of each.
        let mut header: Vec<u64> = if self.rank == root {
            describe(&data)
        } else {
            Vec::new()
        };
        let mut len = header.len() as u64;
        root_process.broadcast_into(&mut len);
        header.resize(len as usize, 0);
        root_process.broadcast_into(&mut header[..]);
        let mut buffers = if self.rank == root {
            data.into_iter().map(aligned).collect()
        } else {
            allocate(&header).map_err(|detail| CollectiveError::Mismatch { rank, detail })?
        };
        for buffer in &mut buffers {
            let bytes: &mut [u8] = &mut buffer.bytes;
            root_process.broadcast_into(bytes);
        }
        Ok(buffers)
    }

    /// Every process's `data`, by process; dtypes and shapes must match.
    pub fn all_gather(
        &self,
        rank: usize,
        data: TensorData,
    ) -> Result<Vec<TensorData>, CollectiveError> {
        let _watch = self.watchdog.enter(rank, "all_gather");
        self.agree(
            rank,
            "all_gather",
            fingerprint(0xA6, std::slice::from_ref(&data)),
        )?;
        let data = aligned(data);
        let size = data.bytes.len();
        let mut all = vec![0u8; size * self.size];
        let send: &[u8] = &data.bytes;
        self.world.all_gather_into(send, &mut all[..]);
        Ok(all
            .chunks(size.max(1))
            .take(self.size)
            .map(|chunk| TensorData::from_bytes_vec(chunk.to_vec(), data.shape.clone(), data.dtype))
            .collect())
    }

    /// Returns once every process has called it.
    pub fn barrier(&self, rank: usize) -> Result<(), CollectiveError> {
        let _watch = self.watchdog.enter(rank, "barrier");
        self.agree(rank, "barrier", 0xBA)?;
        self.world.barrier();
        Ok(())
    }
}

/// A launch in progress (see [`MpiProcesses::training`]).
pub struct Training(());

impl Drop for Training {
    fn drop(&mut self) {
        TRAINING.fetch_sub(1, Ordering::SeqCst);
    }
}

const DTYPES: [DType; 16] = [
    DType::F64,
    DType::F32,
    DType::Flex32,
    DType::F16,
    DType::BF16,
    DType::I64,
    DType::I32,
    DType::I16,
    DType::I8,
    DType::U64,
    DType::U32,
    DType::U16,
    DType::U8,
    DType::Bool(BoolStore::Native),
    DType::Bool(BoolStore::U8),
    DType::Bool(BoolStore::U32),
];

fn dtype_code(dtype: DType) -> u64 {
    DTYPES
        .iter()
        .position(|d| *d == dtype)
        .map_or(u64::MAX, |i| i as u64)
}

/// Buffer count, then for each: dtype code, rank, dims.
fn describe(data: &[TensorData]) -> Vec<u64> {
    let mut header = vec![data.len() as u64];
    for d in data {
        header.push(dtype_code(d.dtype));
        header.push(d.shape.num_dims() as u64);
        header.extend(d.shape.iter().map(|&n| n as u64));
    }
    header
}

/// Zeroed buffers as a [`describe`] header lays out.
fn allocate(header: &[u64]) -> Result<Vec<TensorData>, String> {
    let mut words = header.iter().map(|&w| w as usize);
    let count = words.next().ok_or("empty broadcast header")?;
    (0..count)
        .map(|_| {
            let dtype = words
                .next()
                .and_then(|code| DTYPES.get(code).copied())
                .ok_or("unknown dtype in broadcast header")?;
            let rank = words.next().ok_or("truncated broadcast header")?;
            let dims: Vec<usize> = words.by_ref().take(rank).collect();
            if dims.len() != rank {
                return Err("truncated broadcast header".to_string());
            }
            Ok(aligned(TensorData::full_dtype(dims, 0, dtype)))
        })
        .collect()
}

/// MPI counts elements in a C `int`: a buffer longer than that is refused rather than truncated.
fn fits_count(count: usize, rank: usize, operation: &'static str) -> Result<(), CollectiveError> {
    if i32::try_from(count).is_ok() {
        return Ok(());
    }
    Err(CollectiveError::Engine {
        rank,
        engine: "mpi",
        operation,
        message: format!(
            "{count} elements do not fit an MPI count (at most {}); split the buffer",
            i32::MAX
        ),
    })
}

/// FNV-1a over the operation and each buffer's dtype and shape.
fn fingerprint(op: u64, data: &[TensorData]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for word in std::iter::once(op).chain(describe(data)) {
        for byte in word.to_le_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// Aborts the job when an MPI operation outlives the timeout. MPI collectives cannot time out
/// by themselves; this is what keeps a dead or stuck peer from hanging everyone forever. Its
/// thread also answers the other processes' roll calls (see the module docs).
struct Watchdog {
    shared: Arc<(Mutex<Watch>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Watch {
    /// The operation in progress: rank, name, since when.
    active: Option<(usize, &'static str, Instant)>,
    /// When the last operation ended.
    last_done: Option<Instant>,
    stop: bool,
}

/// Clears the watched operation when dropped.
struct Watching<'a>(&'a Watchdog);

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        let (lock, _) = &*self.0.shared;
        let mut watch = lock.lock().unwrap_or_else(PoisonError::into_inner);
        watch.active = None;
        watch.last_done = Some(Instant::now());
    }
}

impl Watchdog {
    fn start(timeout: Duration, roll: SimpleCommunicator) -> Self {
        let shared = Arc::new((Mutex::new(Watch::default()), Condvar::new()));
        let watched = Arc::clone(&shared);
        let roll = RollCall(std::mem::ManuallyDrop::new(roll));
        let thread = std::thread::Builder::new()
            .name("fabric-mpi-watchdog".into())
            .spawn(move || watch(&watched, timeout, &roll))
            .ok();
        Self { shared, thread }
    }

    fn enter(&self, rank: usize, operation: &'static str) -> Watching<'_> {
        let (lock, _) = &*self.shared;
        lock.lock().unwrap_or_else(PoisonError::into_inner).active =
            Some((rank, operation, Instant::now()));
        Watching(self)
    }
}

fn watch(shared: &(Mutex<Watch>, Condvar), timeout: Duration, roll: &RollCall) {
    let (lock, wake) = shared;
    let mut state = lock.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if state.stop {
            return;
        }
        let answer = Answer::of(&state);
        let expired = state
            .active
            .filter(|(_, _, since)| since.elapsed() > timeout);
        drop(state);
        {
            let finalized = MPI_GATE.lock().unwrap_or_else(PoisonError::into_inner);
            if *finalized {
                return;
            }
            roll.answer_queries(answer);
            if let Some((rank, operation, _)) = expired {
                let blame = roll.call(answer);
                eprintln!(
                    "burn-fabric: rank {rank} waited {timeout:?} in MPI `{operation}`; {blame}; aborting the job"
                );
                // SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE; MPI_Abort may be called
                // from any thread and does not return on success. Should it return, `_exit`
                // ends the process without the atexit handler (which takes the gate held here).
                unsafe {
                    mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 4);
                    libc::_exit(4);
                }
            }
        }
        state = lock.lock().unwrap_or_else(PoisonError::into_inner);
        state = wake
            .wait_timeout(state, Duration::from_millis(100))
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

/// What a process's watchdog answers a roll call: whether it waits in a collective, and for how
/// long it has waited or been outside every collective (milliseconds).
#[derive(Clone, Copy)]
struct Answer {
    in_collective: bool,
    millis: u64,
}

impl Answer {
    fn of(watch: &Watch) -> Self {
        let millis =
            |since: Instant| u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
        match (watch.active, watch.last_done) {
            (Some((_, _, since)), _) => Self {
                in_collective: true,
                millis: millis(since),
            },
            (None, Some(done)) => Self {
                in_collective: false,
                millis: millis(done),
            },
            (None, None) => Self {
                in_collective: false,
                millis: u64::MAX,
            },
        }
    }

    fn words(self) -> [u64; 2] {
        [u64::from(self.in_collective), self.millis]
    }
}

/// The watchdogs' communicator (a duplicate of the world's). Never freed: the watchdog stops
/// when MPI is finalised, after which freeing it would be an error.
struct RollCall(std::mem::ManuallyDrop<SimpleCommunicator>);

// SAFETY: MPI runs with MPI_THREAD_MULTIPLE, and only the watchdog thread uses this
// communicator once it is moved there.
unsafe impl Send for RollCall {}

const QUERY: i32 = 1;
const REPLY: i32 = 2;
/// How long a roll call waits for answers.
const ROLL_CALL_WAIT: Duration = Duration::from_secs(2);

impl RollCall {
    /// Answers every roll call other processes have sent.
    fn answer_queries(&self, mine: Answer) {
        while let Some(status) = self.0.any_process().immediate_probe_with_tag(QUERY) {
            let from = status.source_rank();
            // Already arrived (probed): receiving it does not wait.
            let (_query, _) = self
                .0
                .process_at_rank(from)
                .receive_vec_with_tag::<u64>(QUERY);
            self.post(from, REPLY, &mine.words());
        }
    }

    /// Sends `words` to `process` without waiting for it to be delivered (a stopped or cut-off
    /// peer must not block the watchdog on its way to `MPI_Abort`). The send completes in the
    /// background from a leaked buffer: a few bytes per roll call, which happens once per
    /// failed job.
    fn post(&self, process: i32, tag: i32, words: &[u64]) {
        let buffer: &'static [u64] = Box::leak(words.to_vec().into_boxed_slice());
        let count = std::os::raw::c_int::try_from(buffer.len()).unwrap_or(0);
        let mut request = std::mem::MaybeUninit::<mpi::ffi::MPI_Request>::uninit();
        // SAFETY: MPI runs with MPI_THREAD_MULTIPLE; the buffer lives for the rest of the
        // process; a request is freed only when MPI_Isend created it (freeing an active send
        // request lets it complete on its own).
        unsafe {
            let started = mpi::ffi::MPI_Isend(
                buffer.as_ptr().cast(),
                count,
                u64::equivalent_datatype().as_raw(),
                process,
                tag,
                self.0.as_raw(),
                request.as_mut_ptr(),
            );
            if started == 0 {
                mpi::ffi::MPI_Request_free(request.as_mut_ptr());
            }
        }
    }

    /// Asks every other process where it is and says who is to blame for the wait.
    fn call(&self, mine: Answer) -> String {
        let me = self.0.rank();
        let size = self.0.size();
        for process in (0..size).filter(|p| *p != me) {
            self.post(process, QUERY, &[0]);
        }
        let mut answers: Vec<Option<[u64; 2]>> = vec![None; usize::try_from(size).unwrap_or(0)];
        let started = Instant::now();
        while started.elapsed() < ROLL_CALL_WAIT
            && answers
                .iter()
                .enumerate()
                .any(|(p, a)| a.is_none() && p != me as usize)
        {
            self.answer_queries(mine);
            while let Some(status) = self.0.any_process().immediate_probe_with_tag(REPLY) {
                let from = status.source_rank();
                let (words, _) = self
                    .0
                    .process_at_rank(from)
                    .receive_vec_with_tag::<u64>(REPLY);
                if let (Some(slot), &[in_collective, millis]) =
                    (answers.get_mut(from as usize), &words[..])
                {
                    *slot = Some([in_collective, millis]);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let ranks = RANKS_PER_PROCESS.load(Ordering::SeqCst);
        let name = |p: usize| match ranks {
            1 => format!("process {p} (rank {p})"),
            n => format!("process {p} (ranks {}-{})", p * n, p * n + n - 1),
        };
        let mut blame = Vec::new();
        for (process, answer) in answers.iter().enumerate() {
            match answer {
                _ if process == me as usize => {}
                None => blame.push(format!(
                    "{} did not answer within {ROLL_CALL_WAIT:?}: it is stopped, hung in the system, or cut off from this process",
                    name(process)
                )),
                Some([0, millis]) if *millis == u64::MAX => blame.push(format!(
                    "{} has not reached any collective yet: it is stuck in the program's own code",
                    name(process)
                )),
                Some([0, millis]) => blame.push(format!(
                    "{} is outside every collective (its last one ended {:.1?} ago): it is stuck in the program's own code",
                    name(process),
                    Duration::from_millis(*millis)
                )),
                Some(_) => {}
            }
        }
        if blame.is_empty() {
            "every process answered from inside a collective (they disagree on which one)".into()
        } else {
            blame.join("; ")
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap_or_else(PoisonError::into_inner).stop = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
