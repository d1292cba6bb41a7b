"""fp16's dynamic loss scale follows Megatron-LM's DynamicGradScaler step by step (written out here from
its rules: back off after `hysteresis` overflows, grow after `window` clean steps, reset hysteresis on
growth, never below the floor)."""

from megaclone.train.precision import DynamicLossScale


def test_the_loss_scale_backs_off_after_hysteresis_and_grows_after_a_clean_window():
    s = DynamicLossScale(scale=1024.0, min_scale=256.0, window=3, hysteresis=2, hysteresis_tracker=2)
    trace = []
    for overflowed in (True, True, True, False, False, False, True, True, True, True):
        s.update(overflowed)
        trace.append(s.scale)
    # 1st overflow: hysteresis 2 -> 1, kept; 2nd: -> 0, halved; 3rd: halved again (hysteresis stays spent);
    # 3 clean steps: doubled, hysteresis back to 2; then 2 overflows to halve, and the floor holds
    assert trace == [1024, 512, 256, 256, 256, 512, 512, 256, 256, 256]


def test_the_loss_scale_state_round_trips_in_megatron_lms_keys():
    s = DynamicLossScale(scale=2.0**16, growth_tracker=5, hysteresis_tracker=1)
    state = s.state_dict()
    assert set(state) == {"scale", "growth_tracker", "hysteresis_tracker"}
    t = DynamicLossScale(scale=1.0)
    t.load_state_dict(state)
    assert (t.scale, t.growth_tracker, t.hysteresis_tracker) == (2.0**16, 5, 1)
