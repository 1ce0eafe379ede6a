-- Argo CD health check for finetune.dev/FineTuneJob (deploy/argocd/README in docs/gitops.md).
-- Pending/Running -> Progressing, Succeeded -> Healthy, Failed -> Degraded, Suspended -> Suspended.
-- Status not yet written, or written for an older generation of the spec -> Progressing.
local hs = {}

local function progress_text(p)
  if p == nil or p.step == nil then
    return nil
  end
  local text
  if p.totalSteps ~= nil and p.totalSteps > 0 then
    text = string.format("step %d/%d (%d%%)", math.floor(p.step), math.floor(p.totalSteps),
      math.floor(100 * p.step / p.totalSteps))
  else
    text = string.format("step %d", math.floor(p.step))
  end
  if p.loss ~= nil then
    text = text .. string.format(", loss %.4f", p.loss)
  end
  if p.etaSeconds ~= nil then
    text = text .. string.format(", ETA %dm", math.floor((p.etaSeconds + 59) / 60))
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
  hs.message = string.format("Waiting for the operator to observe generation %d", math.floor(generation))
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
    hs.message = hs.message .. string.format(" (preempted %d times)", math.floor(status.preemptions))
  end
elseif phase == "Pending" then
  hs.status = "Progressing"
  hs.message = message or "Pending"
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
