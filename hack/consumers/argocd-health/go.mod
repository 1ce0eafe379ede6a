module finetune.dev/hack/consumers/argocd-health

go 1.24.0

// The versions of Argo CD v3.5.1's go.mod.
require (
	github.com/yuin/gopher-lua v1.1.2
	layeh.com/gopher-json v0.0.0-20190114024228-97fed8db8427
)
