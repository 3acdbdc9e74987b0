/* How a device buffer travels in point-to-point calls, and the measured model that
 * picks the way for each message.
 *
 *   oneshot  the pack kernel writes straight into mapped pinned host staging (a receive:
 *            the unpack kernel reads it): one launch, no copy, but every byte crosses
 *            the bus as the kernel touches it - good for small messages.
 *   device   pack into device staging, then one bulk copy into pinned staging (a
 *            receive: one bulk copy in, then unpack on the device): two steps, at the
 *            copy engine's bandwidth.
 *   aware    only over a CUDA-aware MPI: a contiguous buffer is handed to the MPI as it
 *            is; a derived one is packed into device staging and that device buffer is
 *            handed over as MPI_PACKED (a receive: the MPI fills device staging, then
 *            unpack on the device).
 *
 * Without kernels every method still moves the right bytes (the pack dispatcher's
 * host-side span copies); only the timing differs.
 *
 * The model: per direction, method and layout (contiguous or derived) the time of one
 * message measured at a few sizes by `commlib measure`, interpolated linearly in
 * between (extrapolated from the last two sizes above); the method predicted fastest
 * wins.  Built-in curves stand in when no file was measured, or the file is malformed
 * or for another GPU or MPI (with a warning).  COMMLIB_METHOD forces a method. */
#ifndef COMMLIB_TRANSFER_MODEL_H
#define COMMLIB_TRANSFER_MODEL_H

#include <stddef.h>
#include <stdio.h>
#include <stdint.h>

#include "../cuda/device.h"

enum transfer_method { METHOD_ONESHOT, METHOD_DEVICE, METHOD_AWARE, METHOD_COUNT };
extern const char *const transfer_method_name[METHOD_COUNT];

/* Whether the host MPI takes device pointers: COMMLIB_CUDA_AWARE, else the MPI's own
 * MPIX_Query_cuda_support (looked up, never linked); asked once, after MPI_Init. */
void transfer_detect_cuda_aware(void);
int transfer_cuda_aware(void);

/* The method for one message of `bytes` packed bytes whose buffer lives on dc's device;
 * contiguous: the message is one dense block.  Never METHOD_AWARE unless CUDA-aware. */
enum transfer_method transfer_method_choose(struct device_context *dc, int receiving, int contiguous, int64_t bytes);

/* The method's time for one message as a line through the model's curve (the file's, else
 * the built-in one): *latency_us at 0 bytes and *bytes_per_us, fitted between 1 MiB and
 * 64 MiB (transfer/pipeline.c cuts messages by it). */
void transfer_model_line(struct device_context *dc, int receiving, int contiguous, int method, double *latency_us,
                         double *bytes_per_us);

/* JSON for `commlib info` and tests: CUDA-awareness and how it was found, the model in
 * effect (file or built-in, why) and the method it picks at a few sizes. */
size_t transfer_model_json(char *buf, size_t len);

/* COMMLIB_STATS: one line on the model in effect (when a device message consulted it)
 * or on the forced method. */
void transfer_model_print(FILE *out, int rank);

#endif
