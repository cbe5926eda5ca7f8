/*
 * train_fixture.h: the training fixtures (tests/fixtures/<model>/train_expected.safetensors,
 * made by tests/make_fixtures.py build_train) on any backend: a fixture model with its
 * batch of Dolly examples, and the checks of the loss and every gradient of that batch,
 * and of 10 AdamW steps, against torch. tests/engine runs them on the CPU backend,
 * tests/gpu on the CUDA backend's modes, each with its tolerances.
 */
#ifndef DOLLY_TRAIN_FIXTURE_H
#define DOLLY_TRAIN_FIXTURE_H

#include "../../src/engine/lora.h"
#include "../../src/engine/safetensors.h"
#include "../../src/engine/train.h"

#define MAX_EXAMPLES 8

/* A fixture model with its training expectations. */
typedef struct train_fixture
{
	dl_backend *be;
	int			owns_be;		/* made by train_open, destroyed by train_close */
	dl_model   *m;
	dl_lora    *lora;			/* a "<model>-lora-<tag>" fixture: the adapter trained */
	st_set	   *exp;
	dl_example	ex[MAX_EXAMPLES];
	int			n;
	int			tokens;
} train_fixture;

/* How far from torch a backend may land: of each tensor's largest gradient, relative to the loss, of the steps. */
typedef struct train_tol
{
	double		grad;
	double		loss;
	double		steps;
} train_tol;

/*
 * Tolerances against torch. Both sides compute in float32 and differ in summation order
 * (BLAS blocking, our double accumulators in the norms' and biases' column sums, the
 * attention blocks) and in exp/erf by a few ulp, so each gradient differs by rounding
 * noise relative to its tensor's largest entry: at most 1.2e-6 of it on the fixtures.
 * We allow 2e-5 of the largest |torch gradient| of each tensor (with a floor of 1e-7
 * absolute for a tensor whose gradient is all but zero): a wrong term, row or head
 * shows as an error of order 1 on that scale. The loss gets 1e-5 relative (measured
 * 2e-7). Over 10 AdamW steps the differences can grow, since Adam divides each gradient
 * by its own running magnitude and so magnifies the rounding of gradients near zero;
 * measured, the losses and pre-clipping gradient norms of the steps stay within 4e-7
 * relative of torch's, and we allow 1e-5.
 */
static const train_tol TRAIN_TOL_F32 = {2e-5, 1e-5, 1e-5};
/*
 * Load tests/fixtures/<name> and its batch on backend be (kept by the caller), or on a
 * new CPU backend of `threads` threads (train_open); a name "<model>-lora-<tag>" loads
 * the model and that adapter, which is then what trains. Return 0 when the fixture is
 * absent (the test skips); *st tells a load failure.
 */
int			train_open_on(const char *name, dl_backend *be, train_fixture *f, dl_error *err,
						  dl_status *st);
int			train_open(const char *name, int threads, train_fixture *f, dl_error *err,
					   dl_status *st);

/* Free what train_open made. */
void		train_close(train_fixture *f);

/* The fixture's optimizer settings (make_fixtures.py ADAMW and the schedule). */
void		fixture_config(const train_fixture *f, dl_train_config *cfg);

/*
 * Harness checks (failing the calling test through failed_) of fixture `name` on be
 * (NULL: a CPU backend of 2 threads): the loss and every gradient of the batch, and the
 * losses, gradient norms and learning rates of 10 AdamW steps.
 */
void		train_check_grads(const char *name, dl_backend *be, const train_tol *tol,
							  int *failed_);
void		train_check_steps(const char *name, dl_backend *be, const train_tol *tol,
							  int *failed_);

#endif
