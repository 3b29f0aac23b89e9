"""kvplug policies: one small dataclass per method, selectable by name."""

from kvplug.policies.compression import (CompressionPolicy, KeepPlan, LayerScores, ReplayChunk,
                                         ReplayPolicy)
from kvplug.policies.base import (POLICIES, Policy, RequestState, RequestStats, build_policy,
                                  param, register_policy)
from kvplug.policies.cake import CAKE
from kvplug.policies.chelsea import Chelsea
from kvplug.policies.duoattention import DuoAttention
from kvplug.policies.full import Full
from kvplug.policies.kvzip import KVzip
from kvplug.policies.selection import (KeySummary, Quest, Selection, SelectionPolicy,
                                       StepContext, StreamingLLM, SummarySpec, recent_tokens)
from kvplug.policies.shadowkv import ShadowKV
from kvplug.policies.snapkv import SnapKV
from kvplug.policies.tidaldecode import TidalDecode
from kvplug.policies.tova import TOVA
from kvplug.policies.zipcache import ZipCache

__all__ = ["POLICIES", "Policy", "RequestState", "RequestStats", "build_policy", "param",
           "register_policy", "Full", "KeySummary", "Quest", "Selection", "SelectionPolicy",
           "ShadowKV", "StepContext", "StreamingLLM", "SummarySpec", "TidalDecode",
           "recent_tokens", "DuoAttention", "CompressionPolicy", "KeepPlan", "LayerScores",
           "SnapKV", "Chelsea", "CAKE", "TOVA", "ZipCache", "KVzip", "ReplayChunk",
           "ReplayPolicy"]
