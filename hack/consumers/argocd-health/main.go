// argocd-health runs resource health checks the way Argo CD v3.5.1 does (util/lua/lua.go and
// util/settings/settings.go at commit 109ca7ca71139e514114499d294a492e7910a965), on the same Lua
// engine (gopher-lua v1.1.2, layeh.com/gopher-json as in Argo CD's go.mod). Importing util/lua
// itself would pull in Argo CD's API server, Kubernetes client and gRPC (minutes of build); what it
// does for a health check is the few functions below, kept line for line.
//
//	argocd-health -builtin DIR [-cm FILE] < objects.json
//
// DIR holds built-in checks laid out as Argo CD's resource_customizations (GROUP/KIND/health.lua,
// run with the standard libraries open); FILE is the JSON of an argocd-cm ConfigMap's data, whose
// resource.customizations.health.GROUP_KIND key wins over the built-in and runs with the libraries
// closed unless resource.customizations.useOpenLibs.GROUP_KIND is true. stdin is a JSON array of
// objects; stdout a JSON array of {"status", "message"} or {"error"} per object, in order.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	lua "github.com/yuin/gopher-lua"
	luajson "layeh.com/gopher-json"
)

type healthStatus struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
}

type resourceOverride struct {
	HealthLua   string
	UseOpenLibs bool
}

// overridesFromConfigMap is settings.appendResourceOverridesFromSplitKeys, for the two keys a health
// check uses.
func overridesFromConfigMap(data map[string]string) (map[string]resourceOverride, error) {
	overrides := map[string]resourceOverride{}
	for k, v := range data {
		if !strings.HasPrefix(k, "resource.customizations") {
			continue
		}
		parts := strings.SplitN(k, ".", 4)
		if len(parts) < 4 {
			continue
		}
		groupKind := strings.Split(parts[3], "_")
		key := parts[3]
		if len(groupKind) == 2 {
			key = groupKind[0] + "/" + groupKind[1]
		} else if len(groupKind) != 1 || parts[3] == "" {
			return nil, fmt.Errorf("group kind should be in format `resource.customizations.<type>.<group_kind>`, got %q", parts[3])
		}
		val := overrides[key]
		switch parts[2] {
		case "health":
			val.HealthLua = v
		case "useOpenLibs":
			b, err := strconv.ParseBool(v)
			if err != nil {
				return nil, err
			}
			val.UseOpenLibs = b
		}
		overrides[key] = val
	}
	return overrides, nil
}

// healthScript is VM.GetHealthScript without wildcards: the ConfigMap's script as configured,
// else the built-in one with the standard libraries open.
func healthScript(overrides map[string]resourceOverride, builtin string, obj map[string]any) (string, bool, error) {
	apiVersion, _ := obj["apiVersion"].(string)
	kind, _ := obj["kind"].(string)
	key := kind
	if group, _, ok := strings.Cut(apiVersion, "/"); ok {
		key = group + "/" + kind
	}
	if o, ok := overrides[key]; ok && o.HealthLua != "" {
		return o.HealthLua, o.UseOpenLibs, nil
	}
	data, err := os.ReadFile(filepath.Join(builtin, key, "health.lua"))
	if err != nil {
		return "", false, err
	}
	return string(data), true, nil
}

// runLua is VM.runLuaWithResourceActionParameters without action parameters.
func runLua(obj map[string]any, script string, useOpenLibs bool) (*lua.LState, error) {
	l := lua.NewState(lua.Options{
		SkipOpenLibs: !useOpenLibs,
	})
	defer l.Close()
	for _, pair := range []struct {
		n string
		f lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.OsLibName, OpenSafeOs},
	} {
		if err := l.CallByParam(lua.P{
			Fn:      l.NewFunction(pair.f),
			NRet:    0,
			Protect: true,
		}, lua.LString(pair.n)); err != nil {
			panic(err)
		}
	}
	l.PreloadModule(lua.OsLibName, SafeOsLoader)

	ctx, cancel := context.WithTimeout(context.Background(), 1*time.Second)
	defer cancel()
	l.SetContext(ctx)

	l.SetGlobal("actionParams", l.CreateTable(0, 0))
	l.SetGlobal("obj", decodeValue(l, obj))
	err := l.DoString(script)

	var apiErr *lua.ApiError
	if errors.As(err, &apiErr) {
		if apiErr.Type == lua.ApiErrorRun {
			apiErr.StackTrace = ""
			err = apiErr
		}
	}
	return l, err
}

// executeHealthLua is VM.ExecuteHealthLua.
func executeHealthLua(obj map[string]any, script string, useOpenLibs bool) (*healthStatus, error) {
	l, err := runLua(obj, script, useOpenLibs)
	if err != nil {
		return nil, err
	}
	returnValue := l.Get(-1)
	if returnValue.Type() == lua.LTTable {
		jsonBytes, err := luajson.Encode(returnValue)
		if err != nil {
			return nil, err
		}
		hs := &healthStatus{}
		if err := json.Unmarshal(jsonBytes, hs); err != nil {
			// As in Argo CD, any type error (an empty table encodes as an array) is an empty status.
			typeError := &json.UnmarshalTypeError{Value: "array"}
			if errors.As(err, &typeError) {
				return &healthStatus{}, nil
			}
			return nil, err
		}
		switch hs.Status {
		case "Unknown", "Progressing", "Suspended", "Healthy", "Degraded", "Missing":
			return hs, nil
		}
		return &healthStatus{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	} else if returnValue.Type() == lua.LTNil {
		return &healthStatus{}, nil
	}
	return nil, fmt.Errorf("expect table output from Lua script, not %s", returnValue.Type().String())
}

// decodeValue is util/lua's decodeValue: how the unstructured object reaches Lua.
func decodeValue(l *lua.LState, value any) lua.LValue {
	switch converted := value.(type) {
	case bool:
		return lua.LBool(converted)
	case float64:
		return lua.LNumber(converted)
	case string:
		return lua.LString(converted)
	case json.Number:
		return lua.LString(converted)
	case int:
		return lua.LNumber(converted)
	case int32:
		return lua.LNumber(converted)
	case int64:
		return lua.LNumber(converted)
	case []any:
		arr := l.CreateTable(len(converted), 0)
		for _, item := range converted {
			arr.Append(decodeValue(l, item))
		}
		return arr
	case map[string]any:
		tbl := l.CreateTable(0, len(converted))
		for key, item := range converted {
			tbl.RawSetH(lua.LString(key), decodeValue(l, item))
		}
		return tbl
	case nil:
		return lua.LNil
	}
	return lua.LNil
}

type result struct {
	*healthStatus
	Error string `json:"error,omitempty"`
}

func main() {
	builtin := flag.String("builtin", "", "directory of built-in checks (GROUP/KIND/health.lua)")
	cm := flag.String("cm", "", "JSON file with an argocd-cm ConfigMap's data")
	flag.Parse()

	data := map[string]string{}
	if *cm != "" {
		raw, err := os.ReadFile(*cm)
		if err == nil {
			err = json.Unmarshal(raw, &data)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
	}
	overrides, err := overridesFromConfigMap(data)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var objects []map[string]any
	if err := json.NewDecoder(os.Stdin).Decode(&objects); err != nil {
		fmt.Fprintln(os.Stderr, "stdin: a JSON array of objects:", err)
		os.Exit(2)
	}
	results := make([]result, 0, len(objects))
	for _, obj := range objects {
		script, useOpenLibs, err := healthScript(overrides, *builtin, obj)
		var hs *healthStatus
		if err == nil {
			hs, err = executeHealthLua(obj, script, useOpenLibs)
		}
		if err != nil {
			results = append(results, result{Error: err.Error()})
		} else {
			results = append(results, result{healthStatus: hs})
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
