//! The update as a TensorFlow op, `KerasAdamwUpdate`, registered at run time
//! through TensorFlow's C API for ops and kernels (`tensorflow/c/ops.h`,
//! `tensorflow/c/kernels.h`). The wheel links against no TensorFlow: the
//! functions are looked up in the framework library that TensorFlow has loaded.
//!
//! The op writes out of place. In place would need the C API's variable
//! functions (`TF_GetInputTensorFromVariable`, `TF_AssignUpdateVariable`,
//! `TF_MaybeLockVariableInputMutexesInOrder` in
//! `tensorflow/c/kernels_experimental.h`), which the TensorFlow wheels declare
//! but do not export (2.21 exports only their C++ templates). So the op takes
//! the variables' values and returns new tensors that TensorFlow allocates;
//! `AssignVariableOp` then adopts each as its variable's memory, without a
//! copy. The step stays one pass over memory.
//!
//! One op per variable. Inputs: `params`, `exp_avg`, `exp_avg_sq`,
//! `max_exp_avg_sq` (a list of one with AMSGrad, else empty), `param_copy` (a
//! list of one 16-bit tensor with `copies=1`: the variable whose float32
//! master `params` is; only its shape and dtype are read), `grads`, `step`
//! (int64) and `rates` (float64: learning_rate, weight_decay, beta_1, beta_2,
//! epsilon, and with `stochastic` the seed). Params and grads are float32,
//! bfloat16 or float16, the state float32 or bfloat16 (type attributes
//! `Tparams`, `Tgrads`, `Tstate`, `Tcopy`). Outputs: the new values of the
//! written inputs, each shaped and typed as its input (the copy: the new
//! params rounded, in the same pass). Attributes:
//! `epsilon_mode`, `weight_decay_mode`, `decay_form`, `maximize` and
//! `stochastic` (16-bit stores rounded stochastically). Everything is checked
//! before the first write; a bad call fails the op with an InvalidArgument
//! error naming the input.

use crate::aliasing::{find_overlap, Region};
use crate::math::{DecayForm, DecayMode, EpsilonMode, Hyperparams, InvalidArgument, StepConstants};
use crate::xla_ffi::panic_message;
use crate::{host_state, in_flight, parallel, simd, Rounding, Sources, TensorSlices};
use crate::{DType, Elements, ElementsRef};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

pub const OP_NAME: &str = "KerasAdamwUpdate";
pub const HOST_STATE_OP_NAME: &str = "KerasAdamwUpdateHostState";

macro_rules! opaque {
    ($($name:ident),*) => { $(#[repr(C)] pub struct $name { _opaque: [u8; 0] })* };
}
opaque!(
    Status,
    Tensor,
    OpDefinitionBuilder,
    KernelBuilder,
    OpKernelConstruction,
    OpKernelContext,
    ShapeInferenceContext,
    ShapeHandle
);

type ShapeFunction = unsafe extern "C" fn(*mut ShapeInferenceContext, *mut Status);
type CreateKernel = unsafe extern "C" fn(*mut OpKernelConstruction) -> *mut c_void;
type ComputeKernel = unsafe extern "C" fn(*mut c_void, *mut OpKernelContext);
type DeleteKernel = unsafe extern "C" fn(*mut c_void);

/// The C API functions the op uses, each resolved by name.
macro_rules! c_api {
    ($($field:ident = $symbol:literal: fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        struct Api { $($field: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)* }

        impl Api {
            /// # Safety
            /// `library` must be a handle from `dlopen`, and each symbol found
            /// there must have the signature declared here (TensorFlow's C API).
            unsafe fn resolve(library: *mut c_void) -> Result<Self, String> {
                Ok(Self { $($field: {
                    // SAFETY: a valid handle and a NUL-terminated name.
                    let address = unsafe { libc::dlsym(library, concat!($symbol, "\0").as_ptr().cast()) };
                    if address.is_null() {
                        return Err(format!("TensorFlow's C API has no {}", $symbol));
                    }
                    // SAFETY: the symbol is the C API function of this signature (the caller's contract).
                    unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) $(-> $ret)?>(address) }
                },)* })
            }
        }
    };
}

c_api! {
    new_status = "TF_NewStatus": fn() -> *mut Status;
    delete_status = "TF_DeleteStatus": fn(*mut Status);
    set_status = "TF_SetStatus": fn(*mut Status, c_int, *const c_char);
    code = "TF_GetCode": fn(*const Status) -> c_int;
    message = "TF_Message": fn(*const Status) -> *const c_char;
    new_op = "TF_NewOpDefinitionBuilder": fn(*const c_char) -> *mut OpDefinitionBuilder;
    add_input = "TF_OpDefinitionBuilderAddInput": fn(*mut OpDefinitionBuilder, *const c_char);
    add_output = "TF_OpDefinitionBuilderAddOutput": fn(*mut OpDefinitionBuilder, *const c_char);
    add_attr = "TF_OpDefinitionBuilderAddAttr": fn(*mut OpDefinitionBuilder, *const c_char);
    set_shape_function = "TF_OpDefinitionBuilderSetShapeInferenceFunction":
        fn(*mut OpDefinitionBuilder, ShapeFunction);
    register_op = "TF_RegisterOpDefinition": fn(*mut OpDefinitionBuilder, *mut Status);
    shape_inputs = "TF_ShapeInferenceContextNumInputs": fn(*mut ShapeInferenceContext) -> i64;
    new_shape = "TF_NewShapeHandle": fn() -> *mut ShapeHandle;
    delete_shape = "TF_DeleteShapeHandle": fn(*mut ShapeHandle);
    input_shape = "TF_ShapeInferenceContextGetInput":
        fn(*mut ShapeInferenceContext, c_int, *mut ShapeHandle, *mut Status);
    set_output_shape = "TF_ShapeInferenceContextSetOutput":
        fn(*mut ShapeInferenceContext, c_int, *mut ShapeHandle, *mut Status);
    new_kernel = "TF_NewKernelBuilder":
        fn(*const c_char, *const c_char, CreateKernel, ComputeKernel, DeleteKernel) -> *mut KernelBuilder;
    register_kernel = "TF_RegisterKernelBuilder": fn(*const c_char, *mut KernelBuilder, *mut Status);
    attr_size = "TF_OpKernelConstruction_GetAttrSize":
        fn(*mut OpKernelConstruction, *const c_char, *mut i32, *mut i32, *mut Status);
    attr_string = "TF_OpKernelConstruction_GetAttrString":
        fn(*mut OpKernelConstruction, *const c_char, *mut c_char, usize, *mut Status);
    attr_bool = "TF_OpKernelConstruction_GetAttrBool":
        fn(*mut OpKernelConstruction, *const c_char, *mut u8, *mut Status);
    attr_int64 = "TF_OpKernelConstruction_GetAttrInt64":
        fn(*mut OpKernelConstruction, *const c_char, *mut i64, *mut Status);
    set_is_stateful = "TF_OpDefinitionBuilderSetIsStateful": fn(*mut OpDefinitionBuilder, bool);
    construction_failure = "TF_OpKernelConstruction_Failure": fn(*mut OpKernelConstruction, *mut Status);
    num_inputs = "TF_NumInputs": fn(*mut OpKernelContext) -> c_int;
    input = "TF_GetInput": fn(*mut OpKernelContext, c_int, *mut *mut Tensor, *mut Status);
    allocate_output = "TF_AllocateOutput":
        fn(*mut OpKernelContext, c_int, c_int, *const i64, c_int, usize, *mut Status) -> *mut Tensor;
    compute_failure = "TF_OpKernelContext_Failure": fn(*mut OpKernelContext, *mut Status);
    delete_tensor = "TF_DeleteTensor": fn(*mut Tensor);
    tensor_type = "TF_TensorType": fn(*const Tensor) -> c_int;
    num_dims = "TF_NumDims": fn(*const Tensor) -> c_int;
    dim = "TF_Dim": fn(*const Tensor, c_int) -> i64;
    tensor_data = "TF_TensorData": fn(*const Tensor) -> *mut c_void;
}

const CODE_OK: c_int = 0;
const CODE_INVALID_ARGUMENT: c_int = 3;
const CODE_INTERNAL: c_int = 13;

const DTYPE_FLOAT: c_int = 1;
const DTYPE_BFLOAT16: c_int = 14;
const DTYPE_HALF: c_int = 19;
const DTYPE_DOUBLE: c_int = 2;
const DTYPE_INT64: c_int = 9;

/// Set once the op is registered; the kernel's callbacks read it.
static API: OnceLock<Api> = OnceLock::new();

/// Whether the ops are registered; held while registering them.
static REGISTERED: Mutex<bool> = Mutex::new(false);

/// The registration's lock, held across a fork (`crate::fork`).
pub(crate) fn lock() -> std::sync::MutexGuard<'static, impl Sized> {
    REGISTERED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers the op and its CPU kernel with the TensorFlow whose framework
/// library is loaded from `framework_library`. Once that succeeds, later calls
/// return at once; a failed call may be retried.
pub fn register(framework_library: &str) -> Result<(), String> {
    let mut registered = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    if !*registered {
        let api = load(framework_library)?;
        let api = API.get_or_init(|| api);
        // SAFETY: the functions of a loaded TensorFlow, called as its C API says.
        unsafe { register_with(api) }?;
        *registered = true;
    }
    Ok(())
}

fn load(framework_library: &str) -> Result<Api, String> {
    let path = CString::new(framework_library).map_err(|_| "a path with a NUL byte")?;
    // RTLD_NOLOAD: only the library TensorFlow itself loaded, never a second copy.
    // SAFETY: a NUL-terminated path; the handle is kept for the process's life.
    let library = unsafe {
        libc::dlopen(
            path.as_ptr(),
            libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_LOCAL,
        )
    };
    if library.is_null() {
        return Err(format!(
            "TensorFlow's framework library {framework_library} is not loaded in this process"
        ));
    }
    // SAFETY: a dlopen handle of TensorFlow's framework library, which exports its C API.
    unsafe { Api::resolve(library) }
}

/// An owned `TF_Status`.
struct StatusBox<'a> {
    api: &'a Api,
    raw: *mut Status,
}

impl<'a> StatusBox<'a> {
    fn new(api: &'a Api) -> Self {
        // SAFETY: TF_NewStatus has no preconditions.
        Self {
            api,
            raw: unsafe { (api.new_status)() },
        }
    }

    fn check(&self, what: &str) -> Result<(), String> {
        // SAFETY: a live status.
        if unsafe { (self.api.code)(self.raw) } == CODE_OK {
            return Ok(());
        }
        // SAFETY: a live status; TF_Message returns a NUL-terminated string it owns.
        let message = unsafe { CStr::from_ptr((self.api.message)(self.raw)) };
        Err(format!("{what}: {}", message.to_string_lossy()))
    }

    fn set(&self, code: c_int, message: &str) {
        let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
        // SAFETY: a live status; TF copies the message.
        unsafe { (self.api.set_status)(self.raw, code, message.as_ptr()) }
    }
}

impl Drop for StatusBox<'_> {
    fn drop(&mut self) {
        // SAFETY: ours, freed once.
        unsafe { (self.api.delete_status)(self.raw) }
    }
}

/// # Safety
/// `api` must be a loaded TensorFlow's C API.
unsafe fn register_with(api: &'static Api) -> Result<(), String> {
    let name = CString::new(OP_NAME).expect("no NUL");
    let status = StatusBox::new(api);
    // SAFETY: the C API as documented in ops.h; TF_RegisterOpDefinition frees the builder.
    unsafe {
        let op = (api.new_op)(name.as_ptr());
        for input in [
            c"params: Tparams",
            c"exp_avg: Tstate",
            c"exp_avg_sq: Tstate",
            c"max_exp_avg_sq: amsgrad * Tstate",
            c"param_copy: copies * Tcopy",
            c"grads: Tgrads",
            c"step: int64",
            c"rates: double",
        ] {
            (api.add_input)(op, input.as_ptr());
        }
        for output in [
            c"new_params: Tparams",
            c"new_exp_avg: Tstate",
            c"new_exp_avg_sq: Tstate",
            c"new_max_exp_avg_sq: amsgrad * Tstate",
            c"new_param_copy: copies * Tcopy",
        ] {
            (api.add_output)(op, output.as_ptr());
        }
        for attr in [
            c"amsgrad: int >= 0",
            c"copies: int >= 0 = 0",
            c"Tcopy: {bfloat16, half} = DT_BFLOAT16",
            c"Tparams: {float, bfloat16, half} = DT_FLOAT",
            c"Tgrads: {float, bfloat16, half} = DT_FLOAT",
            c"Tstate: {float, bfloat16} = DT_FLOAT",
            c"epsilon_mode: string",
            c"weight_decay_mode: string",
            c"decay_form: string = ''",
            c"maximize: bool = false",
            c"stochastic: bool = false",
        ] {
            (api.add_attr)(op, attr.as_ptr());
        }
        (api.set_shape_function)(op, infer_shapes);
        (api.register_op)(op, status.raw);
    }
    status.check(&format!("registering the op {OP_NAME}"))?;
    // SAFETY: the C API as documented in kernels.h; registering takes the builder.
    unsafe {
        let kernel = (api.new_kernel)(
            name.as_ptr(),
            c"CPU".as_ptr(),
            create_kernel,
            compute,
            delete_kernel,
        );
        (api.register_kernel)(name.as_ptr(), kernel, status.raw);
    }
    status.check(&format!("registering the CPU kernel of {OP_NAME}"))?;
    // SAFETY: as above.
    unsafe { register_host_state_op(api) }
}

/// `KerasAdamwUpdateHostState`: the same update with the state in host arrays
/// registered with `host_state` (as the XLA handler takes it), updated in
/// place. Inputs `params`, `grads`, `step`, `rates`; output `new_params`;
/// attribute `host_state` (the id) beside the options. Stateful, so TF never
/// prunes, merges or reorders it.
///
/// # Safety
/// As for `register_with`.
unsafe fn register_host_state_op(api: &'static Api) -> Result<(), String> {
    let name = CString::new(HOST_STATE_OP_NAME).expect("no NUL");
    let status = StatusBox::new(api);
    // SAFETY: the C API as documented in ops.h; TF_RegisterOpDefinition frees the builder.
    unsafe {
        let op = (api.new_op)(name.as_ptr());
        for input in [
            c"params: Tparams",
            c"grads: Tgrads",
            c"step: int64",
            c"rates: double",
        ] {
            (api.add_input)(op, input.as_ptr());
        }
        (api.add_output)(op, c"new_params: Tparams".as_ptr());
        for attr in [
            c"host_state: int",
            c"Tparams: {float, bfloat16, half} = DT_FLOAT",
            c"Tgrads: {float, bfloat16, half} = DT_FLOAT",
            c"epsilon_mode: string",
            c"weight_decay_mode: string",
            c"decay_form: string = ''",
            c"maximize: bool = false",
            c"stochastic: bool = false",
        ] {
            (api.add_attr)(op, attr.as_ptr());
        }
        (api.set_is_stateful)(op, true);
        (api.set_shape_function)(op, infer_shapes);
        (api.register_op)(op, status.raw);
    }
    status.check(&format!("registering the op {HOST_STATE_OP_NAME}"))?;
    // SAFETY: the C API as documented in kernels.h; registering takes the builder.
    unsafe {
        let kernel = (api.new_kernel)(
            name.as_ptr(),
            c"CPU".as_ptr(),
            create_host_state_kernel,
            compute,
            delete_kernel,
        );
        (api.register_kernel)(name.as_ptr(), kernel, status.raw);
    }
    status.check(&format!(
        "registering the CPU kernel of {HOST_STATE_OP_NAME}"
    ))
}

/// Inputs after the written ones: grads, step, rates.
const TRAILING_INPUTS: usize = 3;

/// Each output has the shape of the input it is the new value of.
unsafe extern "C" fn infer_shapes(ctx: *mut ShapeInferenceContext, status: *mut Status) {
    let Some(api) = API.get() else { return };
    // SAFETY: TF's live context and status for the call; the handle is ours.
    unsafe {
        let written = (api.shape_inputs)(ctx) - TRAILING_INPUTS as i64;
        let shape = (api.new_shape)();
        for i in 0..written.max(0) as c_int {
            (api.input_shape)(ctx, i, shape, status);
            if (api.code)(status) != CODE_OK {
                break;
            }
            (api.set_output_shape)(ctx, i, shape, status);
        }
        (api.delete_shape)(shape);
    }
}

/// The kernel's fixed options, from the op's attributes.
struct Options {
    epsilon_mode: EpsilonMode,
    weight_decay_mode: DecayMode,
    decay_form: Option<DecayForm>,
    maximize: bool,
    /// 16-bit stores rounded stochastically.
    stochastic: bool,
    /// A 16-bit copy of the new params is written (`KerasAdamwUpdate` only).
    copies: bool,
    /// The registered host state (`KerasAdamwUpdateHostState` only).
    host_state: Option<u64>,
}

unsafe extern "C" fn create_kernel(ctx: *mut OpKernelConstruction) -> *mut c_void {
    // SAFETY: TF's live construction context.
    unsafe { create(ctx, false) }
}

unsafe extern "C" fn create_host_state_kernel(ctx: *mut OpKernelConstruction) -> *mut c_void {
    // SAFETY: TF's live construction context.
    unsafe { create(ctx, true) }
}

/// # Safety
/// `ctx` must be TF's live construction context.
unsafe fn create(ctx: *mut OpKernelConstruction, host_state: bool) -> *mut c_void {
    let Some(api) = API.get() else {
        return std::ptr::null_mut();
    };
    let status = StatusBox::new(api);
    // SAFETY: TF's live construction context.
    let options =
        std::panic::catch_unwind(|| unsafe { read_options(api, ctx, &status, host_state) });
    match options {
        Ok(Ok(options)) => Box::into_raw(Box::new(options)).cast(),
        failed => {
            let message = match failed {
                Ok(Err(e)) => e,
                Err(panic) => panic_message(&*panic),
                Ok(Ok(_)) => unreachable!(),
            };
            status.set(CODE_INVALID_ARGUMENT, &format!("keras_adamw: {message}"));
            // SAFETY: TF's live construction context and our status.
            unsafe { (api.construction_failure)(ctx, status.raw) };
            std::ptr::null_mut()
        }
    }
}

/// # Safety
/// `ctx` must be TF's live construction context.
unsafe fn read_options(
    api: &Api,
    ctx: *mut OpKernelConstruction,
    status: &StatusBox<'_>,
    host_state: bool,
) -> Result<Options, String> {
    let text = |name: &CStr| -> Result<String, String> {
        let (mut list_size, mut total_size) = (0i32, 0i32);
        // SAFETY: the caller's contract; TF writes the two sizes.
        unsafe {
            (api.attr_size)(
                ctx,
                name.as_ptr(),
                &mut list_size,
                &mut total_size,
                status.raw,
            )
        };
        status.check(&name.to_string_lossy())?;
        let mut bytes = vec![0u8; total_size.max(0) as usize + 1];
        // SAFETY: TF writes at most `bytes.len()` bytes.
        unsafe {
            (api.attr_string)(
                ctx,
                name.as_ptr(),
                bytes.as_mut_ptr().cast(),
                bytes.len(),
                status.raw,
            )
        };
        status.check(&name.to_string_lossy())?;
        bytes.truncate(total_size.max(0) as usize);
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let mut maximize = 0u8;
    // SAFETY: the caller's contract; TF writes one byte.
    unsafe { (api.attr_bool)(ctx, c"maximize".as_ptr(), &mut maximize, status.raw) };
    status.check("maximize")?;
    let decay_form = text(c"decay_form")?;
    let mut stochastic = 0u8;
    // SAFETY: the caller's contract; TF writes one byte.
    unsafe { (api.attr_bool)(ctx, c"stochastic".as_ptr(), &mut stochastic, status.raw) };
    status.check("stochastic")?;
    let mut copies = 0i64;
    if !host_state {
        // SAFETY: the caller's contract; TF writes one int64.
        unsafe { (api.attr_int64)(ctx, c"copies".as_ptr(), &mut copies, status.raw) };
        status.check("copies")?;
    }
    if !(0..=1).contains(&copies) {
        return Err(format!(
            "copies must be 0 or 1 (a list of param_copy), got {copies}"
        ));
    }
    let host_state = if host_state {
        let mut id = 0i64;
        // SAFETY: the caller's contract; TF writes one int64.
        unsafe { (api.attr_int64)(ctx, c"host_state".as_ptr(), &mut id, status.raw) };
        status.check("host_state")?;
        Some(u64::try_from(id).map_err(|_| format!("host_state must be >= 0, got {id}"))?)
    } else {
        None
    };
    let error = |e: InvalidArgument| e.to_string();
    Ok(Options {
        epsilon_mode: EpsilonMode::parse(&text(c"epsilon_mode")?).map_err(error)?,
        weight_decay_mode: DecayMode::parse(&text(c"weight_decay_mode")?).map_err(error)?,
        decay_form: match decay_form.as_str() {
            "" => None,
            form => Some(DecayForm::parse(form).map_err(error)?),
        },
        maximize: maximize != 0,
        stochastic: stochastic != 0,
        copies: copies == 1,
        host_state,
    })
}

unsafe extern "C" fn delete_kernel(kernel: *mut c_void) {
    if !kernel.is_null() {
        // SAFETY: made by Box::into_raw in create_kernel, freed once.
        drop(unsafe { Box::from_raw(kernel.cast::<Options>()) });
    }
}

unsafe extern "C" fn compute(kernel: *mut c_void, ctx: *mut OpKernelContext) {
    let Some(api) = API.get() else { return };
    // SAFETY: TF passes the kernel create_kernel made (not null, or TF would not run it).
    let options = unsafe { &*kernel.cast::<Options>() };
    // A panic must not unwind into TensorFlow's C++ frames.
    // SAFETY: TF's live kernel context for the call.
    let outcome = std::panic::catch_unwind(|| unsafe { run(api, options, ctx) });
    let (code, message) = match outcome {
        Ok(Ok(())) => return,
        Ok(Err(e)) => (CODE_INVALID_ARGUMENT, format!("keras_adamw: {e}")),
        Err(panic) => (
            CODE_INTERNAL,
            format!("keras_adamw: the update failed: {}", panic_message(&*panic)),
        ),
    };
    let status = StatusBox::new(api);
    status.set(code, &message);
    // SAFETY: TF's live kernel context and our status.
    unsafe { (api.compute_failure)(ctx, status.raw) };
}

/// A tensor of the call, deleted (its reference dropped) at the end.
struct TensorRef<'a> {
    api: &'a Api,
    raw: *mut Tensor,
}

impl TensorRef<'_> {
    fn tf_dtype(&self) -> c_int {
        // SAFETY: a live tensor.
        unsafe { (self.api.tensor_type)(self.raw) }
    }

    /// The kernel's element type of the tensor (checked by `check_inputs`).
    fn dtype(&self) -> Result<DType, String> {
        match self.tf_dtype() {
            DTYPE_FLOAT => Ok(DType::F32),
            DTYPE_BFLOAT16 => Ok(DType::Bf16),
            DTYPE_HALF => Ok(DType::F16),
            other => Err(format!(
                "has TensorFlow dtype {other}, not a float the kernel takes"
            )),
        }
    }

    fn dims(&self) -> Vec<i64> {
        // SAFETY: a live tensor; indices below its rank.
        unsafe {
            (0..(self.api.num_dims)(self.raw))
                .map(|i| (self.api.dim)(self.raw, i))
                .collect()
        }
    }

    fn len(&self) -> usize {
        self.dims().iter().map(|&d| d.max(0) as usize).product()
    }

    fn data(&self) -> *mut c_void {
        // SAFETY: a live tensor.
        unsafe { (self.api.tensor_data)(self.raw) }
    }
}

impl Drop for TensorRef<'_> {
    fn drop(&mut self) {
        // SAFETY: ours, deleted once; the buffer lives on in TF while TF refers to it.
        unsafe { (self.api.delete_tensor)(self.raw) }
    }
}

const WRITTEN: [&str; 4] = ["params", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"];

/// # Safety
/// `ctx` must be TF's live kernel context.
unsafe fn run(api: &Api, options: &Options, ctx: *mut OpKernelContext) -> Result<(), String> {
    if let Some(id) = options.host_state {
        // SAFETY: the caller's contract.
        return unsafe { run_host_state(api, options, id, ctx) };
    }
    let call = Call::new(api, ctx);
    // SAFETY: the caller's contract.
    let inputs = unsafe { (api.num_inputs)(ctx) }.max(0) as usize;
    // The written inputs: params and the state lists, then any param_copy.
    let written = inputs.saturating_sub(TRAILING_INPUTS);
    let lists = written.saturating_sub(usize::from(options.copies));
    if !(3..=4).contains(&lists) {
        return Err(format!(
            "amsgrad must be 0 or 1 (lists of max_exp_avg_sq), got {}",
            lists.saturating_sub(3)
        ));
    }
    let sources = (0..lists)
        .map(|index| call.input(index))
        .collect::<Result<Vec<_>, _>>()?;
    let copy = options.copies.then(|| call.input(lists)).transpose()?;
    let grads = call.input(written)?;
    let step = call.input(written + 1)?;
    let rates = call.input(written + 2)?;
    let named = WRITTEN
        .iter()
        .copied()
        .zip(&sources)
        .chain(copy.iter().map(|c| ("param_copy", c)))
        .chain([("grads", &grads)]);
    let dims = check_inputs(named)?;
    let (constants, rounding) = step_constants(options, &step, &rates)?;
    let level = simd::active_level().map_err(|e| e.to_string())?;

    // Checked: allocate the results, each of its input's dtype, which TF hands on as the op's outputs.
    let len = sources[0].len();
    let outputs = sources
        .iter()
        .enumerate()
        .map(|(index, source)| call.allocate(index, &dims, source.dtype()?, WRITTEN[index]))
        .collect::<Result<Vec<_>, String>>()?;
    let copy_output = copy
        .as_ref()
        .map(|c| call.allocate(lists, &dims, c.dtype()?, "param_copy"))
        .transpose()?;

    let region = |t: &TensorRef<'_>, written: bool, label: &'static str| -> Result<_, String> {
        Ok(Region {
            start: t.data() as usize,
            len_bytes: len * t.dtype()?.size(),
            written,
            label,
        })
    };
    // The inputs are only read (they may share memory); the outputs are fresh.
    let mut regions = vec![region(&grads, false, "grads")?];
    for (i, (source, output)) in sources.iter().zip(&outputs).enumerate() {
        regions.push(region(source, false, WRITTEN[i])?);
        regions.push(region(output, true, WRITTEN[i])?);
    }
    if let Some(output) = &copy_output {
        regions.push(region(output, true, "param_copy")?);
    }
    // Waits for any host call writing memory the op reads (an array TF wraps without a copy).
    let _claim = in_flight::claim(&regions);
    let read = |t: &TensorRef<'_>| -> Result<ElementsRef<'_>, String> {
        // SAFETY: an aligned buffer of `len` elements of its dtype (checked) that nothing writes during the call (claimed).
        Ok(unsafe { ElementsRef::from_raw(t.dtype()?, t.data().cast(), len) })
    };
    let write = |t: &TensorRef<'_>| -> Result<Elements<'_>, String> {
        // SAFETY: an output of `len` elements of its dtype, freshly allocated by TF, so overlapping nothing else.
        Ok(unsafe { Elements::from_raw(t.dtype()?, t.data().cast(), len) })
    };
    let from = Sources {
        params: read(&sources[0])?,
        exp_avg: Some(read(&sources[1])?),
        exp_avg_sq: Some(read(&sources[2])?),
        max_exp_avg_sq: sources.get(3).map(read).transpose()?,
    };
    let mut to = TensorSlices::of_elements(
        write(&outputs[0])?,
        read(&grads)?,
        write(&outputs[1])?,
        write(&outputs[2])?,
        outputs.get(3).map(write).transpose()?,
    )
    .map_err(|e| e.to_string())?;
    if let Some(output) = &copy_output {
        to = to
            .with_param_copy(write(output)?)
            .map_err(|e| e.to_string())?;
    }
    parallel::adamw_step_from(vec![(from, to)], &constants, rounding, level);
    Ok(())
}

/// One kernel call: its inputs and outputs, errors reported through one status.
struct Call<'a> {
    api: &'a Api,
    ctx: *mut OpKernelContext,
    status: StatusBox<'a>,
}

impl<'a> Call<'a> {
    fn new(api: &'a Api, ctx: *mut OpKernelContext) -> Self {
        let status = StatusBox::new(api);
        Self { api, ctx, status }
    }

    /// Input `index`; TF hands back a new reference, deleted with the TensorRef.
    fn input(&self, index: usize) -> Result<TensorRef<'a>, String> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: TF's live context for the call; TF reports a bad index in the status.
        unsafe { (self.api.input)(self.ctx, index as c_int, &mut raw, self.status.raw) };
        self.status.check(&format!("input {index}"))?;
        Ok(TensorRef { api: self.api, raw })
    }

    /// Output `index`, a tensor of `dims` and `dtype` that TF allocates fresh.
    fn allocate(
        &self,
        index: usize,
        dims: &[i64],
        dtype: DType,
        name: &str,
    ) -> Result<TensorRef<'a>, String> {
        let len = dims.iter().product::<i64>().max(0) as usize;
        let tf_dtype = match dtype {
            DType::Bf16 => DTYPE_BFLOAT16,
            DType::F16 => DTYPE_HALF,
            _ => DTYPE_FLOAT,
        };
        // SAFETY: TF's live context for the call; TF reports a bad index in the status.
        let raw = unsafe {
            (self.api.allocate_output)(
                self.ctx,
                index as c_int,
                tf_dtype,
                dims.as_ptr(),
                dims.len() as c_int,
                len * dtype.size(),
                self.status.raw,
            )
        };
        self.status.check(&format!("allocating new_{name}"))?;
        Ok(TensorRef { api: self.api, raw })
    }
}

/// Checks that the named inputs are aligned tensors of float dtypes the kernel
/// takes, of the first one's shape; returns that shape. (The op's type
/// attributes already limit each input's dtype; the kernel checks the
/// combination.)
fn check_inputs<'t>(
    named: impl IntoIterator<Item = (&'t str, &'t TensorRef<'t>)>,
) -> Result<Vec<i64>, String> {
    let mut dims = None;
    for (name, tensor) in named {
        let first = dims.get_or_insert_with(|| tensor.dims());
        let dtype = tensor.dtype().map_err(|e| format!("{name} {e}"))?;
        if tensor.dims() != *first {
            return Err(format!(
                "{name} has shape {:?} where params has {first:?}",
                tensor.dims()
            ));
        }
        if tensor.len() > 0 && !(tensor.data() as usize).is_multiple_of(dtype.size()) {
            return Err(format!("{name} is not an aligned {} buffer", dtype.name()));
        }
    }
    Ok(dims.unwrap_or_default())
}

/// The step constants and the rounding from the `step` and `rates` inputs
/// and the options.
fn step_constants(
    options: &Options,
    step: &TensorRef<'_>,
    rates: &TensorRef<'_>,
) -> Result<(StepConstants, Rounding), String> {
    let count = if options.stochastic { 6 } else { 5 };
    let (step, rates) = (
        scalars::<i64>(step, DTYPE_INT64, 1, "step")?,
        scalars::<f64>(rates, DTYPE_DOUBLE, count, "rates")?,
    );
    let step = u64::try_from(step[0])
        .ok()
        .filter(|&s| s >= 1)
        .ok_or_else(|| format!("step must be an integer >= 1, got {}", step[0]))?;
    let rounding = match rates.get(5) {
        None => Rounding::Nearest,
        Some(&seed) if seed >= 0.0 && seed.fract() == 0.0 && seed < u64::MAX as f64 => {
            Rounding::Stochastic {
                seed: seed as u64,
                step,
            }
        }
        Some(seed) => return Err(format!("the seed must be an integer >= 0, got {seed}")),
    };
    let constants = Hyperparams {
        step,
        learning_rate: rates[0],
        weight_decay: rates[1],
        beta_1: rates[2],
        beta_2: rates[3],
        epsilon: rates[4],
        epsilon_mode: options.epsilon_mode,
        weight_decay_mode: options.weight_decay_mode,
        decay_form: options.decay_form,
        maximize: options.maximize,
        grad_scale: None,
    }
    .constants()
    .map_err(|e| e.to_string())?;
    Ok((constants, rounding))
}

/// `KerasAdamwUpdateHostState`: new params out of place, the registered
/// host state in place. With host masters, the update runs on the master and
/// the new params are its rounded copy (the params input is not read).
///
/// # Safety
/// As for `run`.
unsafe fn run_host_state(
    api: &Api,
    options: &Options,
    id: u64,
    ctx: *mut OpKernelContext,
) -> Result<(), String> {
    let call = Call::new(api, ctx);
    let (params, grads) = (call.input(0)?, call.input(1)?);
    let (constants, rounding) = step_constants(options, &call.input(2)?, &call.input(3)?)?;
    let dims = check_inputs([("params", &params), ("grads", &grads)])?;
    let len = params.len();
    let state = host_state::lookup(id)
        .ok_or_else(|| format!("host_state {id} is not registered (its HostState was freed)"))?;
    for (name, list) in state.named_lists(&WRITTEN[1..]) {
        match list {
            [held] if held.len == len => {}
            _ => {
                return Err(format!(
                    "host_state {id} holds {name} of {:?} elements where params has {len}",
                    list.iter().map(|b| b.len).collect::<Vec<_>>()
                ))
            }
        }
    }
    let (params_dtype, masters) = (params.dtype()?, state.masters.as_ref().map(|m| m[0]));
    if masters.is_some() && params_dtype == DType::F32 {
        return Err(format!(
            "params must be bfloat16 or float16 with host_state {id}'s masters"
        ));
    }
    let level = simd::active_level().map_err(|e| e.to_string())?;
    let output = call.allocate(0, &dims, params_dtype, "params")?;

    let region = |t: &TensorRef<'_>, written: bool, label: &'static str| -> Result<_, String> {
        Ok(Region {
            start: t.data() as usize,
            len_bytes: len * t.dtype()?.size(),
            written,
            label,
        })
    };
    let mut regions = vec![
        region(&grads, false, "grads")?,
        region(&params, false, "params")?,
        region(&output, true, "params")?,
    ];
    for (name, list) in state.named_lists(&WRITTEN[1..]) {
        regions.extend(list[0].regions(name));
    }
    if let Some((a, b)) = find_overlap(&regions) {
        return Err(format!("host_state {id}'s {b} shares memory with {a}"));
    }
    // Waits for any other call on the same host state.
    let _claim = in_flight::claim(&regions);
    let read = |t: &TensorRef<'_>| -> Result<ElementsRef<'_>, String> {
        // SAFETY: an aligned buffer of `len` elements of its dtype (checked) that nothing writes during the call (claimed).
        Ok(unsafe { ElementsRef::from_raw(t.dtype()?, t.data().cast(), len) })
    };
    // SAFETY: a fresh output of `len` elements of its dtype, overlapping nothing else.
    let new_params = unsafe { Elements::from_raw(params_dtype, output.data().cast(), len) };
    // SAFETY: registered state, alive while `state` is; it overlaps nothing
    // else in the call (checked) and no other call (claimed).
    let held = |list: usize| {
        state
            .lists
            .get(list)
            .map(|buffers| unsafe { buffers[0].elements() })
    };
    // With masters the kernel updates the master and writes the new params as its copy.
    let (updated, copy) = match masters {
        // SAFETY: as for `held`.
        Some(master) => (unsafe { master.elements() }, Some(new_params)),
        None => (new_params, None),
    };
    let mut tensor = TensorSlices::of_elements(
        updated,
        read(&grads)?,
        held(0).expect("exp_avgs"),
        held(1).expect("exp_avg_sqs"),
        held(2),
    )
    .map_err(|e| e.to_string())?;
    match copy {
        Some(copy) => {
            tensor = tensor.with_param_copy(copy).map_err(|e| e.to_string())?;
            parallel::adamw_step(vec![tensor], &constants, rounding, level);
        }
        None => {
            let from = Sources {
                params: read(&params)?,
                exp_avg: None,
                exp_avg_sq: None,
                max_exp_avg_sq: None,
            };
            parallel::adamw_step_from(vec![(from, tensor)], &constants, rounding, level);
        }
    }
    Ok(())
}

/// A small host tensor's values, checked for dtype and count.
fn scalars<T: Copy>(
    tensor: &TensorRef<'_>,
    dtype: c_int,
    count: usize,
    name: &str,
) -> Result<Vec<T>, String> {
    let data = tensor.data().cast::<T>();
    if tensor.tf_dtype() != dtype || tensor.len() != count || data.is_null() {
        return Err(format!(
            "{name} must be {count} {}",
            if dtype == DTYPE_INT64 {
                "int64"
            } else {
                "float64"
            }
        ));
    }
    // SAFETY: `count` elements of T, checked above (read unaligned to be safe).
    Ok((0..count)
        .map(|i| unsafe { data.add(i).read_unaligned() })
        .collect())
}
