// Sabotage switches for tools/sabotage_device.sh (docs/device_testing.md): a build with
// -DZEROCKPT_SABOTAGE=<n> drops site n of the device pipeline (a stream wait, an event record or
// a synchronisation) to show that a device test fails without it. Every other build keeps all
// sites: ZEROCKPT_SITE(n) is then the constant true.
#pragma once

#ifndef ZEROCKPT_SABOTAGE
#define ZEROCKPT_SABOTAGE 0
#endif
#define ZEROCKPT_SITE(n) (ZEROCKPT_SABOTAGE != (n))
