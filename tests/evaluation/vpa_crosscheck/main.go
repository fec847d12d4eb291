// Command vpa_crosscheck feeds usage events to VPA's own recommender code (the Go module
// k8s.io/autoscaler/vertical-pod-autoscaler) and prints its recommendation, so the Python port in
// ../baselines.py can be checked against the real thing. Input on stdin (JSON):
//
//	{"containers": {"<name>": [{"t": <unix seconds>, "kind": "cpu"|"mem"|"oom", "v": <cores|bytes|request bytes>}, ...]}}
//
// Output: {"<name>": {"target": {"cpu": <millicores>, "memory": <bytes>}, "lower": ..., "upper": ...}}.
// Regenerate the fixture with: python3 tests/evaluation/crosscheck_vpa.py --regenerate
package main

import (
	"encoding/json"
	"os"
	"time"

	"k8s.io/autoscaler/vertical-pod-autoscaler/pkg/recommender/logic"
	"k8s.io/autoscaler/vertical-pod-autoscaler/pkg/recommender/model"
)

type event struct {
	T    float64 `json:"t"`
	Kind string  `json:"kind"`
	V    float64 `json:"v"`
}

func main() {
	var in struct {
		Containers map[string][]event `json:"containers"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	// The defaults of pkg/recommender/config/config.go.
	rec := logic.CreatePodResourceRecommender(logic.RecommendationConfig{
		SafetyMarginFraction: 0.15, PodMinCPUMillicores: 25, PodMinMemoryMb: 250,
		TargetCPUPercentile: 0.9, LowerBoundCPUPercentile: 0.5, UpperBoundCPUPercentile: 0.95,
		ConfidenceIntervalCPU: 24 * time.Hour, TargetMemoryPercentile: 0.9,
		LowerBoundMemoryPercentile: 0.5, UpperBoundMemoryPercentile: 0.95,
		ConfidenceIntervalMemory: 24 * time.Hour,
	})
	states := model.ContainerNameToAggregateStateMap{}
	for name, events := range in.Containers {
		agg := model.NewAggregateContainerState()
		container := model.NewContainerState(model.Resources{}, agg)
		for _, e := range events {
			ts := time.Unix(0, int64(e.T*1e9)).UTC()
			switch e.Kind {
			case "cpu":
				container.AddSample(&model.ContainerUsageSample{MeasureStart: ts, Usage: model.CPUAmountFromCores(e.V), Resource: model.ResourceCPU})
			case "mem":
				container.AddSample(&model.ContainerUsageSample{MeasureStart: ts, Usage: model.MemoryAmountFromBytes(e.V), Resource: model.ResourceMemory})
			case "oom":
				_ = container.RecordOOM(ts, model.MemoryAmountFromBytes(e.V))
			}
		}
		states[name] = agg
	}
	out := map[string]map[string]map[string]int64{}
	for name, r := range rec.GetRecommendedPodResources(states) {
		out[name] = map[string]map[string]int64{
			"target": {"cpu": int64(r.Target[model.ResourceCPU]), "memory": int64(r.Target[model.ResourceMemory])},
			"lower":  {"cpu": int64(r.LowerBound[model.ResourceCPU]), "memory": int64(r.LowerBound[model.ResourceMemory])},
			"upper":  {"cpu": int64(r.UpperBound[model.ResourceCPU]), "memory": int64(r.UpperBound[model.ResourceMemory])},
		}
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
}
