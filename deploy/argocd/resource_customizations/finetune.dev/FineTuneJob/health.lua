-- Argo CD health check for finetune.dev/FineTuneJob (deploy/argocd/README in docs/gitops.md).
-- Pending/Running -> Progressing, Succeeded -> Healthy, Failed -> Degraded, Suspended -> Suspended.
-- Status not yet written, or written for an older generation of the spec -> Progressing.
-- Installed in argocd-cm, Argo CD runs it without Lua's string and math libraries (useOpenLibs off),
-- so numbers are formatted with arithmetic, tostring and `..` only.
local hs = {}

local function int(x)
  return tostring(x - x % 1)
end

local function fixed4(x)
  if x < 0 then
    return "-" .. fixed4(-x)
  end
  local scaled = x * 10000 + 0.5
  scaled = scaled - scaled % 1
  local frac = tostring(scaled % 10000)
  while #frac < 4 do
    frac = "0" .. frac
  end
  return int(scaled / 10000) .. "." .. frac
end

local function progress_text(p)
  if p == nil or p.step == nil then
    return nil
  end
  local text
  if p.totalSteps ~= nil and p.totalSteps > 0 then
    text = "step " .. int(p.step) .. "/" .. int(p.totalSteps) .. " (" .. int(100 * p.step / p.totalSteps) .. "%)"
  else
    text = "step " .. int(p.step)
  end
  if p.loss ~= nil then
    text = text .. ", loss " .. fixed4(p.loss)
  end
  if p.etaSeconds ~= nil then
    text = text .. ", ETA " .. int((p.etaSeconds + 59) / 60) .. "m"
  end
  return text
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the job"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. int(generation)
  return hs
end

local phase = status.phase
local message = status.message
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message or "Training and export finished"
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message or "Training failed"
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message or "Suspended"
elseif phase == "Running" then
  hs.status = "Progressing"
  hs.message = progress_text(status.progress) or message or "Running"
  if status.preemptions ~= nil and status.preemptions > 0 then
    hs.message = hs.message .. " (preempted " .. int(status.preemptions) .. " times)"
  end
elseif phase == "Pending" or phase == "Queued" or phase == "Preempted" then
  hs.status = "Progressing"
  hs.message = message or phase
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
