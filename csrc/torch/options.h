// The public option structs (zerockpt/zerockpt.h) as the torch layer's own options. Both the
// C++ API and the Python binding convert through here, so the two cannot drift apart.
#pragma once

#include "core/io_engine.h"
#include "zerockpt/zerockpt.h"

namespace zerockpt {

// The write options of `options`; `progress` (not owned, may be null) counts the bytes written
// and can stop the write. The user's metadata stays in `options.metadata`.
WriteOptions write_options(const SaveOptions& options, Progress* progress = nullptr);

}  // namespace zerockpt
