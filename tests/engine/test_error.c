/* test_error.c: dl_fail and dl_hint fill the record the glue reports. */
#include "harness.h"
#include "../../src/engine/error.h"

#include <string.h>

TEST(error_fail_and_hint)
{
	dl_error	err;

	CHECK(dl_fail(&err, DL_EFORMAT, "tensor \"%s\" has %d dims", "wte", 3) == DL_EFORMAT);
	CHECK(err.code == DL_EFORMAT);
	CHECK(strcmp(err.msg, "tensor \"wte\" has 3 dims") == 0);
	CHECK(err.hint[0] == '\0');
	CHECK(dl_hint(&err, "re-download %s", "model.safetensors") == DL_EFORMAT);
	CHECK(strcmp(err.hint, "re-download model.safetensors") == 0);
	CHECK(dl_fail(NULL, DL_EIO, "ignored") == DL_EIO);
}
